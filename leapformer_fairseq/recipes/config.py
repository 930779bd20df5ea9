"""Named training configurations: the YAML files under ``configs/`` that the recipes' training
steps read, their command-line overrides, and the record of a run (docs/recipes.md).

A configuration file::

    recipe: t2t train              # the step that reads it: t2t train, s2t train-asr, s2t train-st
    extends: t2t/small             # optional: start from another configuration
    fairseq-train:                 # fairseq-train options: flag without -- -> value
      arch: leapformer_waitk_transformer_small
      waitk-lagging: 3
      share-all-embeddings: true   # true: the bare flag; false or null: left out
      lr: 0.001

A name (``t2t/small``) is ``configs/t2t/small.yaml``; a value ending in ``.yaml`` is a path
(relative to the working directory on the command line, to the extending file in ``extends``).
Options are applied in order, later ones winning: the extended configuration, the file, the
recipe's own flags (``--lr``, ``--waitk``, ...), ``--set KEY=VALUE``, then fairseq-train options
after ``--``. fairseq's own parser (with the model's and task's options) then checks the result:
an unknown option or a bad value is refused naming where it was set, and an alias
(``fixed-pre-decision-ratio``) is recorded under its option's first name (``frames-per-unit``).
Every problem raises :class:`ConfigError` with a one-line message naming the file or flag and
the key. A training step into a run directory whose ``checkpoint_last.pt`` (which fairseq-train
resumes) was trained with other options is refused before anything is written
(:func:`check_resume`).
"""
import argparse
import copy
import io
import json
import logging
import re
import shlex
import threading
import warnings
from argparse import Namespace
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import yaml

from leapformer_fairseq.compat import INITIALISATIONS
from leapformer_fairseq.recipes.common import FAIRSEQ_TRAIN, ROOT, Recipe, write_text

CONFIGS = ROOT / "configs"
RECIPES = ("t2t train", "s2t train-asr", "s2t train-st")
KEYS = ("recipe", "extends", "fairseq-train")
# fairseq-train options (by their names in its args) a run may change when it resumes from its
# checkpoint, or be adopted with: where its data, its checkpoints and the plugin are, the device
# (and the GPU count fairseq's distributed options default to), the budget, the paths of the
# encoder and decoder a speech-translation run started from (the checkpoint replaces them), the
# arch's name
RESUMABLE = ("data", "save_dir", "user_dir", "cpu", "distributed_world_size",
             "distributed_num_procs", "nprocs_per_node", "max_update",
             *INITIALISATIONS.keys(), *INITIALISATIONS.values(), "_name")
RECORD_LOCK = threading.Lock()


class ConfigError(ValueError):
    """A configuration, or an override of one, that cannot be used; the message is one line."""


@dataclass
class TrainConfig:
    """A configuration with its overrides: ``options`` in the order they were last set (so a
    key wins over an alias of it set before), ``sources`` where each was set (a file or a flag),
    ``keys`` in the order they were first set (the order they are recorded in)."""

    name: str
    recipe: str
    options: Dict[str, Any] = field(default_factory=dict)
    sources: Dict[str, str] = field(default_factory=dict)
    keys: Dict[str, None] = field(default_factory=dict)

    def set(self, key: str, value: Any, source: str) -> None:
        check_option(key, value, source)
        self.options.pop(key, None)
        self.options[key] = value
        self.sources[key] = source
        self.keys.setdefault(key)


def config_path(name: str, base: Path = Path()) -> Path:
    """``configs/<name>.yaml`` for a name, ``base / name`` for a path (``*.yaml``)."""
    return base / name if name.endswith((".yaml", ".yml")) else CONFIGS / f"{name}.yaml"


def available(recipe: Optional[str] = None) -> List[str]:
    """Names of the configurations under ``configs/`` (of ``recipe`` only, if given); the study
    files in ``configs/studies/`` are not training configurations."""
    names = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        if CONFIGS / "studies" in path.parents:
            continue
        name = path.relative_to(CONFIGS).with_suffix("").as_posix()
        try:
            if recipe is None or load_config(name).recipe == recipe:
                names.append(name)
        except ConfigError:
            continue
    return names


def load_config(name: str, recipe: Optional[str] = None) -> TrainConfig:
    """The configuration ``name`` (a name under ``configs/`` or a path), with what it extends;
    refused unless it is for ``recipe`` (when given)."""
    path = config_path(name)
    if not path.is_file():
        if name.endswith((".yaml", ".yml")):
            raise ConfigError(f"--config {name}: no such file")
        raise ConfigError(f"--config {name}: no configuration {path}; available: "
                          f"{', '.join(available(recipe)) or 'none'}")
    config = _load(path, ())
    config.name = name
    if config.recipe not in RECIPES:
        raise ConfigError(f"{path}: recipe: {config.recipe or 'missing'}; one of "
                          f"{', '.join(RECIPES)}")
    if recipe is not None and config.recipe != recipe:
        raise ConfigError(f"--config {name}: {path} is for '{config.recipe}' (its recipe: key), "
                          f"not '{recipe}'")
    return config


def load_file(path: Path, extra_keys: Sequence[str] = ()) -> TrainConfig:
    """The configuration in the file ``path`` with what it extends, named by the path, its
    ``recipe:`` not checked; the file may hold ``extra_keys`` beside the configuration's own (a
    study file's ``study:``, leapformer_fairseq.recipes.study), which the caller reads."""
    config = _load(Path(path), (), tuple(extra_keys))
    config.name = str(path)
    return config


def _load(path: Path, chain: Tuple[Path, ...], extra_keys: Tuple[str, ...] = ()) -> TrainConfig:
    if path.resolve() in chain:
        raise ConfigError(f"{path}: extends itself (through "
                          f"{' -> '.join(str(p) for p in chain)})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML ({getattr(error, 'problem', None) or error}"
                          f"{where})".replace("\n", " ")) from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 ({error.reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a configuration is a mapping with the keys "
                          f"{', '.join(KEYS)}; this holds {type(data).__name__}")
    keys = (*KEYS, *extra_keys)
    unknown = [key for key in data if key not in keys]
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (a configuration holds "
                          f"{', '.join(keys)}; fairseq-train options go under fairseq-train:)")
    if "extends" in data:
        parent = data["extends"]
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: extends: a configuration name or path, got {parent!r}")
        parent_path = config_path(parent, path.parent)
        if not parent_path.is_file():
            raise ConfigError(f"{path}: extends: no configuration {parent_path}; available: "
                              f"{', '.join(available())}")
        config = _load(parent_path, (*chain, path.resolve()))
    else:
        config = TrainConfig(name=str(path), recipe="")
    if "recipe" in data:
        config.recipe = data["recipe"]
    options = data.get("fairseq-train") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{path}: fairseq-train: a mapping of fairseq-train options, got "
                          f"{type(options).__name__}")
    for key, value in options.items():
        config.set(str(key), value, str(path))
    return config


def check_option(key: str, value: Any, source: str) -> None:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", key):
        raise ConfigError(f"{source}: '{key}' is not a fairseq-train option name (the flag "
                          "without its leading --, e.g. max-update)")
    if isinstance(value, list):
        good = bool(value) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                   for v in value)
    else:
        good = isinstance(value, (str, int, float, bool, type(None)))
    if not good:
        raise ConfigError(f"{source}: {key}: a value is a number, a string, true, false, null "
                          f"or a list of numbers and strings; got {value!r}")


# ------------------------------------------------------------------------------ overrides
def attention_types(label: str) -> List[str]:
    """``leap`` -> the type of all three blocks; ``leap-softmax-leap`` -> encoder, decoder and
    cross-attention types."""
    from leapformer_fairseq.modules import ATTN_TYPES

    types = label.split("-")
    if len(types) == 1:
        types = types * 3
    if len(types) != 3 or any(t not in ATTN_TYPES for t in types):
        raise ConfigError(f"--attn-type {label}: one of {', '.join(ATTN_TYPES)}, or three of "
                          "them joined by - (encoder-decoder-cross, e.g. leap-leap-softmax)")
    return types


def attention_label(types: Sequence[str]) -> str:
    """The run name of per-block attention types: ``leap`` when all three agree, else
    ``encoder-decoder-cross``."""
    return types[0] if len(set(types)) == 1 else "-".join(types)


@dataclass
class Shortcut:
    """A recipe flag that sets fairseq-train options: ``values`` turns its value into one value
    per key (``--attn-type leap`` sets the three attention types)."""

    flag: str
    keys: Tuple[str, ...]
    help: str
    type: Any = str
    aliases: Tuple[str, ...] = ()
    values: Callable[[Any], List[Any]] = lambda value: [value]

    @property
    def dest(self) -> str:
        return "set_" + self.flag.lstrip("-").replace("-", "_")


ATTENTION_KEYS = ("encoder-attn-type", "decoder-attn-type", "cross-attn-type")


def waitk_value(text: str) -> Any:
    """``--waitk``'s type: fairseq's ``--waitk-lagging`` type (one k, or a multi-path set)."""
    from leapformer_fairseq.models.leapformer_transformer import waitk_lagging_value

    return waitk_lagging_value(text)


WAITK = Shortcut("--waitk", ("waitk-lagging",), "wait-k lagging k; several (a range 1-9, a list "
                 "1,3,5) train one multi-path model", waitk_value)
SHORTCUTS = (
    Shortcut("--arch", ("arch",), "the registered architecture"),
    Shortcut("--attn-type", ATTENTION_KEYS, "attention type of all blocks, or the encoder, "
             "decoder and cross-attention types joined by -", values=attention_types),
    WAITK,
    Shortcut("--lr", ("lr",), "peak learning rate", float),
    Shortcut("--warmup", ("warmup-updates",), "inverse-sqrt warm-up updates", int),
    Shortcut("--max-tokens", ("max-tokens",), "tokens (speech: feature frames) per batch", int),
    Shortcut("--max-update", ("max-update",), "training updates", int),
    Shortcut("--seed", ("seed",), "random seed", int),
    Shortcut("--cpu", ("cpu",), "train on the CPU", bool),
    Shortcut("--fp16", ("fp16",), "train in float16 (CUDA)", bool),
)
FRAMES_PER_UNIT = Shortcut("--frames-per-unit", ("frames-per-unit",),
                           "encoder frames (40 ms) per source unit of the wait-k schedule", int,
                           aliases=("--pre-decision-ratio",))


def add_shortcuts(parser: argparse.ArgumentParser, shortcuts: Sequence[Shortcut]) -> None:
    for shortcut in shortcuts:
        kind = dict(action="store_true") if shortcut.type is bool else dict(
            type=shortcut.type, metavar=shortcut.flag[2:].upper().replace("-", "_"))
        parser.add_argument(shortcut.flag, *shortcut.aliases, dest=shortcut.dest, default=None,
                            help=f"{shortcut.help} (sets {', '.join(shortcut.keys)})", **kind)


def apply_shortcuts(config: TrainConfig, args: Namespace, shortcuts: Sequence[Shortcut]) -> None:
    """The options of the shortcut flags given in ``args``."""
    for shortcut in shortcuts:
        value = getattr(args, shortcut.dest)
        if value is not None:
            source = shortcut.flag if value is True else f"{shortcut.flag} {value}"
            for key, key_value in zip(shortcut.keys, shortcut.values(value)):
                config.set(key, key_value, source)


def add_config_arguments(parser: argparse.ArgumentParser, default: str,
                         shortcuts: Sequence[Shortcut] = SHORTCUTS) -> None:
    """``--config``, the shortcut flags, ``--set`` and fairseq-train options after ``--``."""
    parser.add_argument("--config", default=default,
                        help=f"a configuration name under configs/ or a .yaml path "
                             f"(default {default})")
    add_shortcuts(parser, shortcuts)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set the fairseq-train option KEY to VALUE (YAML); repeatable")
    parser.add_argument("fairseq_args", nargs="*",
                        help="fairseq-train options after --; they win over everything else")


def config_from_arguments(args: Namespace, recipe: str,
                          shortcuts: Sequence[Shortcut] = SHORTCUTS) -> TrainConfig:
    """``--config`` with the command line's overrides, in the documented order."""
    config = load_config(args.config, recipe)
    apply_shortcuts(config, args, shortcuts)
    for text in args.set:
        key, value = parse_set(text)
        config.set(key, value, f"--set {text}")
    for key, value in parse_fairseq_args(args.fairseq_args):
        config.set(key, value, f"after --: --{key}")
    return config


def parse_set(text: str) -> Tuple[str, Any]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise ConfigError(f"--set {text}: expected KEY=VALUE (e.g. --set lr=0.0005)")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return key.strip(), value


def parse_fairseq_args(tokens: Sequence[str]) -> List[Tuple[str, Any]]:
    """fairseq-train options after ``--`` as (key, value): a flag alone is ``True``, with one
    value that string, with several their list; ``--flag=value`` works too."""
    options: List[Tuple[str, Any]] = []
    values: List[str] = []
    for token in tokens:
        if token.startswith("--") and len(token) > 2:
            if options:
                options[-1] = (options[-1][0], option_value(values))
            key, equals, value = token[2:].partition("=")
            options.append((key, None))
            values = [value] if equals else []
        elif not options:
            raise ConfigError(f"after --: '{token}' is not an option (fairseq-train options "
                              "start with --)")
        else:
            values.append(token)
    if options:
        options[-1] = (options[-1][0], option_value(values))
    return options


def option_value(values: List[str]) -> Any:
    return True if not values else values[0] if len(values) == 1 else values


def command_arguments(options: Dict[str, Any]) -> List[str]:
    """The fairseq-train command-line arguments of ``options``."""
    arguments: List[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        arguments.append(f"--{key}")
        if value is not True:
            arguments.extend(str(v) for v in (value if isinstance(value, list) else [value]))
    return arguments


# ------------------------------------------------------------------------------ resolution
@dataclass
class Resolved:
    """A configuration checked by fairseq's parser: ``options`` under their options' first
    names, ``args`` fairseq's parse of ``base`` + ``options``; ``attn_type`` and ``waitk`` name
    its runs: the per-block types the model will use (``resolve_attention_types``, see
    :func:`attention_label`) and ``--waitk-lagging`` (``None``: an offline model)."""

    config: TrainConfig
    base: List[str]
    options: Dict[str, Any]
    sources: Dict[str, str]
    args: Namespace
    attn_type: str
    waitk: Union[int, str, None]

    def command(self, save_dir: Path) -> List[str]:
        return [*self.base, "--save-dir", str(save_dir), *command_arguments(self.options)]


def resolve(config: TrainConfig, base: Sequence) -> Resolved:
    """Check ``config`` with fairseq-train's parser, after the recipe's own arguments ``base``
    (the data directory and the options the recipe sets itself, which a configuration may not
    set, nor ``save-dir``)."""
    from fairseq import options as fairseq_options

    if config.options.get("arch") in (None, False):
        raise ConfigError(f"--config {config.name}: no arch (set fairseq-train: arch: in the "
                          "file, or --arch)")
    base = [str(argument) for argument in base]
    reserved = {argument[2:] for argument in base if argument.startswith("--")} | {"save-dir"}
    for key, source in config.sources.items():
        if key in reserved:
            raise ConfigError(f"{source}: {key} is set by the recipe (from --data and the step); "
                              "leave it out")
    parser = fairseq_options.get_training_parser()
    argv = [*base, *command_arguments(config.options)]
    errors = io.StringIO()
    try:
        with redirect_stderr(errors):
            args, unknown = fairseq_options.parse_args_and_arch(parser, argv, parse_known=True)
    except SystemExit:
        message = errors.getvalue().strip().splitlines()[-1].partition("error: ")[2]
        argument = re.match(r"argument ([^:]+):", message)
        names = re.findall(r"--([\w-]+)", argument[1]) if argument else []
        source = next((config.sources[n] for n in names if n in config.sources), "fairseq-train")
        raise ConfigError(f"{source}: fairseq-train refuses it: {message}") from None
    for token in unknown:
        key = token[2:].partition("=")[0]
        if token.startswith("--") and key in config.sources:
            raise ConfigError(f"{config.sources[key]}: fairseq-train has no option --{key} "
                              f"(with --arch {args.arch} and --task {args.task})")
    if unknown:
        raise ConfigError(f"fairseq-train: unexpected arguments {' '.join(unknown)}")
    names = first_names(parser)
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    for key, value in config.options.items():  # in the order they were set: the last one wins
        values[names.get(key, key)] = value
        sources[names.get(key, key)] = config.sources[key]
    order = dict.fromkeys(names.get(key, key) for key in config.keys)
    return Resolved(config, base, {name: values[name] for name in order}, sources, args,
                    *run_name(config, args))


def run_name(config: TrainConfig, args: Namespace) -> Tuple[str, Union[int, str, None]]:
    from leapformer_fairseq.models.attention_config import (
        ATTENTION_BLOCKS,
        resolve_attention_types,
    )

    args = Namespace(**vars(args))
    try:
        resolve_attention_types(args)
    except ValueError as error:
        raise ConfigError(f"--config {config.name}: {error}") from None
    if not has_option(args.arch, "--waitk-lagging"):  # an offline arch
        waitk = None
    elif getattr(args, "waitk_lagging", None) is None:
        raise ConfigError(f"--config {config.name}: no waitk-lagging (set it in the file, or "
                          "--waitk)")
    else:
        waitk = args.waitk_lagging
    types = [getattr(args, option) for option, _ in ATTENTION_BLOCKS.values()]
    return attention_label(types), waitk


def has_option(arch: str, flag: str) -> bool:
    """Whether the model of the registered ``arch`` has the option ``flag`` (fairseq's parser
    leaves unset model options out of the args, so the args cannot tell)."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    parser = argparse.ArgumentParser(add_help=False)
    ARCH_MODEL_REGISTRY[arch].add_args(parser)
    return any(flag in action.option_strings for action in parser._actions)


def first_names(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """Every long option of ``parser`` (without --) -> its option's first long name."""
    names = {}
    for action in parser._actions:
        long = [option[2:] for option in action.option_strings if option.startswith("--")]
        for option in long:
            names[option] = long[0]
    return names


# ---------------------------------------------------------------------------- run record
def write_run_record(save_dir: Path, resolved: Resolved, command: Sequence) -> None:
    """``config.yaml`` (the resolved configuration, itself a configuration: ``--config
    RUN/config.yaml`` trains it again) and ``hydra_train.yaml`` (the same run as a
    fairseq-hydra-train configuration, every option spelled out) in ``save_dir``."""
    overrides = dict.fromkeys(source for source in resolved.sources.values()
                              if not source.endswith((".yaml", ".yml")))
    header = [
        f"# The configuration of this run: {resolved.config.name}"
        + (f" with {', '.join(overrides)}" if overrides else ""),
        "# fairseq-train " + shlex.join(str(c) for c in command),
    ]
    record = {"recipe": resolved.config.recipe, "fairseq-train": resolved.options}
    write_text(save_dir / "config.yaml", "\n".join(header) + "\n"
               + yaml.safe_dump(record, sort_keys=False, allow_unicode=True, width=100))
    write_text(save_dir / "hydra_train.yaml", hydra_train_config(resolved, save_dir))


def hydra_train_config(resolved: Resolved, save_dir: Path) -> str:
    """fairseq's structured form of the run (``convert_namespace_to_omegaconf``, what fairseq
    saves in checkpoints), as YAML that ``fairseq-hydra-train --config-dir RUN --config-name
    hydra_train`` reads. Our models and fairseq's speech_to_text task are argparse ("legacy")
    components, so their sections hold the whole namespace, as fairseq builds them."""
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf, omegaconf_no_object_check
    from omegaconf import OmegaConf

    args = Namespace(**vars(resolved.args))
    args.save_dir = str(save_dir)
    cfg = convert_namespace_to_omegaconf(args)
    sections = {}
    with omegaconf_no_object_check():
        for key in cfg:
            value = cfg[key]
            if isinstance(value, Namespace):
                value = dict(vars(value))
            elif OmegaConf.is_config(value):
                value = OmegaConf.to_container(value)
            sections[key] = value
    return ("# fairseq-hydra-train --config-dir THIS_DIRECTORY --config-name hydra_train\n"
            + yaml.safe_dump(sections, sort_keys=False, allow_unicode=True, width=100))


# ------------------------------------------------------------------------------- resuming
def plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(value, default=str))


def unwrap(value: Any) -> Any:
    """fairseq parses some options into one-element lists (``--lr 0.001`` is ``[0.001]``)."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


@contextmanager
def quiet_hydra() -> Iterator[None]:
    """Around fairseq's conversion of options to hydra's form: not thread-safe, and noisy
    (deprecation warnings, DEBUG lines)."""
    hydra = logging.getLogger("hydra")
    with RECORD_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = hydra.level
        hydra.setLevel(logging.WARNING)
        try:
            yield
        finally:
            hydra.setLevel(level)


def load_checkpoint(checkpoint: Path) -> Dict[str, Any]:
    """``checkpoint`` loaded on the CPU, memory-mapped (tensors are read when used). A file that
    does not load raises :class:`ConfigError` naming it."""
    import torch

    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # torch raises many kinds for a damaged file
        raise ConfigError(f"{checkpoint}: not a readable fairseq checkpoint "
                          f"({type(error).__name__}: {error})".splitlines()[0]) from None


def recorded_options(state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The fairseq-train options a loaded checkpoint ``state`` was trained with: its
    ``cfg.model``, which for an argparse arch (all under fairseq-train) is the whole parsed
    namespace; ``None`` if it records none."""
    model = (state.get("cfg") or {}).get("model")
    return plain(vars(model)) if isinstance(model, Namespace) else None


def trained_options(checkpoint: Path) -> Optional[Dict[str, Any]]:
    """:func:`recorded_options` of the file ``checkpoint`` (:func:`load_checkpoint`)."""
    return recorded_options(load_checkpoint(checkpoint))


def built_options(args: Namespace) -> Dict[str, Any]:
    """The options a run of fairseq-train's parsed ``args`` (:attr:`Resolved.args`) records in
    its checkpoints: its ``cfg.model`` after the task has built the model from it (which fills
    the arch's defaults in)."""
    from fairseq import tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    with quiet_hydra():
        cfg = convert_namespace_to_omegaconf(Namespace(**copy.deepcopy(vars(args))))
    tasks.setup_task(cfg.task).build_model(cfg.model)
    return plain(vars(cfg.model))


def saved_value(options: Dict[str, Any], name: str) -> Any:
    """The option ``name`` of recorded ``options`` (a checkpoint's, a run record's args;
    ``...`` if missing); unset there (missing or ``None``) before its default changed, its old
    default (``SAVED_DEFAULTS``)."""
    from leapformer_fairseq.models.attention_config import SAVED_DEFAULTS

    value = options.get(name, ...)
    if (value is None or value is ...) and name in SAVED_DEFAULTS:
        return SAVED_DEFAULTS[name]
    return value


def changed_options(there: Dict[str, Any], now: Dict[str, Any],
                    free: Sequence[str] = RESUMABLE) -> List[Tuple[str, Any, Any]]:
    """``(name, value there, value now)`` of every option but ``free`` (by their names in
    fairseq's args) whose recorded value (:func:`saved_value`) in ``there`` differs from
    ``now``; one-element lists unwrapped, ``unset`` for an option one side lacks."""
    def shown(value: Any) -> Any:
        return "unset" if value is ... else unwrap(value)

    changed = []
    for name in dict.fromkeys([*now, *there]):
        before, after = saved_value(there, name), now.get(name, ...)
        if name not in free and before != after:
            changed.append((name, shown(before), shown(after)))
    return changed


def check_resume(save_dir: Path, resolved: Resolved) -> None:
    """Refuse (:class:`ConfigError`) to train ``resolved`` in ``save_dir`` if it holds a
    ``checkpoint_last.pt``, which fairseq-train would resume, trained with other options than
    those a resume may change (RESUMABLE): fairseq-train would fail to load it (another model),
    or go on under a run record that is not the checkpoint's."""
    checkpoint = save_dir / "checkpoint_last.pt"
    if not checkpoint.is_file():
        return
    remedy = "delete the directory or choose another output directory"
    trained = trained_options(checkpoint)
    if trained is None:
        raise ConfigError(f"{checkpoint} records no fairseq-train options (cfg.model) to compare "
                          f"with, and fairseq-train would resume it; {remedy}")
    # built without the encoder or decoder a speech-translation run starts from: the checkpoint
    # replaces them
    args = Namespace(**{**vars(resolved.args), **dict.fromkeys(INITIALISATIONS)})
    changed = changed_options(trained, built_options(args))
    if changed:
        raise ConfigError(
            f"{save_dir} holds a run trained with other options, whose checkpoint_last.pt "
            "fairseq-train would resume ("
            + "; ".join(f"{name.replace('_', '-')}: {before} there, {after} now"
                        for name, before, after in changed)
            + f"); {remedy}")


# ------------------------------------------------------------------------------- training
class Run(NamedTuple):
    """A training run: its directory, named by its attention and wait-k (``None``: offline; a
    multi-path set as its text, ``1-9``)."""

    directory: Path
    attn_type: str
    waitk: Union[int, str, None]


def run_label(attn_type: str, waitk: Union[int, str, None]) -> str:
    """A run directory's name: ``leap_k3``, or ``softmax_offline`` for an offline model."""
    return f"{attn_type}_k{waitk}" if waitk is not None else f"{attn_type}_offline"


def train_run(recipe: Recipe, step: str, resolved: Resolved, save_dir: Path) -> Run:
    """Record ``resolved`` in ``save_dir`` and run fairseq-train there (log: ``train.log``),
    which resumes its ``checkpoint_last.pt``; refused first if that was trained with other
    options (:func:`check_resume`)."""
    try:
        check_resume(save_dir, resolved)
    except ConfigError as error:
        raise recipe.fail(f"{step}: {error}") from None
    save_dir.mkdir(parents=True, exist_ok=True)
    command = resolved.command(save_dir)
    write_run_record(save_dir, resolved, command)
    latency = "offline" if resolved.waitk is None else f"wait-{resolved.waitk}"
    recipe.train([*FAIRSEQ_TRAIN, *command], f"{step} {resolved.attn_type} {latency}",
                 save_dir / "train.log")
    recipe.log(f"{step}: checkpoints in {save_dir}")
    return Run(save_dir, resolved.attn_type, resolved.waitk)
