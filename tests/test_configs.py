"""Named configurations (configs/, leapformer_fairseq.recipes.config): fairseq-train runs from
every one of them at tiny size through the recipes, the command line overrides them in the
documented order, a run records what produced it, fairseq-hydra-train trains the same model from
that record, and every bad configuration or override is refused in one line naming the file or
flag and the key (docs/errors.md).

Real components throughout: the recipes' ``prepare`` on a slice of gettext-mt and on noise in
the MuST-C layout, fairseq-train and fairseq-hydra-train as processes, fairseq's parser. Tiny
size: each configuration's architecture becomes its ``_tiny`` variant and trains 1 update on
the CPU; everything else is the configuration's own.
"""
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import pytest
import soundfile
import torch
import yaml

from leapformer_fairseq.modules import ATTN_TYPES
from leapformer_fairseq.recipes import s2t, t2t
from leapformer_fairseq.recipes.config import (
    CONFIGS,
    Run,
    TrainConfig,
    available,
    config_from_arguments,
    load_config,
    resolve,
)

ROOT = Path(__file__).resolve().parents[1]
TSV = ROOT / "data" / "gettext-mt" / "en-de.{split}.tsv"
# the training configurations (configs/studies/ holds study files: tests/test_study.py)
CONFIG_NAMES = sorted(path.relative_to(CONFIGS).with_suffix("").as_posix()
                      for path in CONFIGS.rglob("*.yaml")
                      if path.relative_to(CONFIGS).parts[0] != "studies")
ENV = {"OMP_NUM_THREADS": "1"}  # the same weights from every run of one configuration


def refusal(function, *args) -> str:
    """The message of the ``SystemExit`` that ``function(*args)`` raises."""
    with pytest.raises(SystemExit) as refused:
        function(*args)
    return str(refused.value.code)


@pytest.fixture(scope="module", autouse=True)
def one_thread_training():
    with pytest.MonkeyPatch.context() as patch:
        for name, value in ENV.items():
            patch.setenv(name, value)
        yield


# ----------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("t2t") / "data"
    t2t.main(["prepare", "--corpus", str(TSV), "--out", str(out), "--max-train", "100",
              "--max-valid", "10", "--max-test", "5", "--vocab-size", "200"])
    return out


@pytest.fixture(scope="module")
def speech_data(tmp_path_factory) -> Path:
    """The speech recipe's prepare on noise in the MuST-C layout: 4 segments of 0.8 s per
    split (train, dev, tst-COMMON), the gettext-mt pairs as transcripts and translations;
    SpecAugment on, so the speech configurations train through its masks."""
    root = tmp_path_factory.mktemp("s2t")
    lines = Path(str(TSV).format(split="train")).read_text(encoding="utf-8").splitlines()[1:]
    pairs = [line.split("\t")[1:] for line in lines if len(line) < 60][:4]
    for number, split in enumerate(("train", "dev", "tst-COMMON")):
        folder = root / "mustc" / "en-de" / "data" / split
        (folder / "wav").mkdir(parents=True)
        (folder / "txt").mkdir()
        noise = np.random.default_rng(number).integers(-3000, 3000, 16000 * 4) / 32768.0
        soundfile.write(folder / "wav" / f"{split}.wav", noise.astype(np.float32), 16000,
                        subtype="PCM_16")
        (folder / "txt" / f"{split}.yaml").write_text("".join(
            f"- {{duration: 0.8, offset: {0.1 + i:.1f}, speaker_id: s, wav: {split}.wav}}\n"
            for i in range(4)), encoding="utf-8")
        for side, index in (("en", 0), ("de", 1)):
            (folder / "txt" / f"{split}.{side}").write_text(
                "".join(pair[index] + "\n" for pair in pairs), encoding="utf-8")
    s2t.main(["prepare", "--data-root", str(root / "mustc"), "--out", str(root / "data"),
              "--vocab-size-asr", "60", "--vocab-size-st", "60", "--specaugment", "sm"])
    for task in ("asr", "st"):  # prepare passed the option on to prep_mustc.py
        config = yaml.safe_load((root / "data" / f"config_{task}.yaml").read_text())
        assert config["feature_transforms"][f"train_{task}"][-1] == "specaugment"
    return root / "data"


def data_copy(data: Path, folder: Path) -> Path:
    """``folder`` holding links to everything in ``data`` but its runs: one set of runs each."""
    if not folder.exists():
        folder.mkdir(parents=True)
        for path in data.iterdir():
            if path.name != "runs":
                (folder / path.name).symlink_to(path)
    return folder


def tiny(config: TrainConfig) -> TrainConfig:
    """``config`` at tiny size: its architecture's ``_tiny`` variant, 1 update, the CPU."""
    arch = re.sub(r"_(small|base|tiny)$", "_tiny", config.options["arch"])
    for key, value in (("arch", arch), ("max-update", 1), ("cpu", True)):
        config.set(key, value, "tiny size")
    return config


@pytest.fixture(scope="module")
def trained(text_data, speech_data, tmp_path_factory) -> Callable[[str], Run]:
    """``trained(name)``: the run of configuration ``name`` at tiny size, trained once through
    its recipe. An ASR and an ST configuration of one size share a data directory, so the ST
    run starts from the encoder of the ASR run of the same attention and k, as by default."""
    runs: Dict[str, Run] = {}
    root = tmp_path_factory.mktemp("runs")
    task_part = re.compile(r"(?<![a-z0-9])(asr|st)(?![a-z0-9])")  # s2t/st_small, s2t/demo_st

    def train(name: str) -> Run:
        if name not in runs:
            config = tiny(load_config(name))
            folder = root / task_part.sub("pair", name)
            if config.recipe == "t2t train":
                runs[name] = t2t.train(data_copy(text_data, folder), config)
            else:
                task = config.recipe.removeprefix("s2t train-")
                if task == "st":
                    train(task_part.sub("asr", name))
                runs[name] = s2t.train(data_copy(speech_data, folder), task, config)
        return runs[name]

    return train


# ----------------------------------------------------------------------- every config
def fairseq_value(value):
    """A parsed fairseq option as a configuration writes it: ``--lr 0.001`` parses to
    ``[0.001]``."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_fairseq_train_runs_from_each_config(name, trained):
    config = load_config(name)
    run = trained(name)
    checkpoint = torch.load(run.directory / "checkpoint_last.pt", weights_only=False)
    assert checkpoint["optimizer_history"][-1]["num_updates"] == 1
    args = checkpoint["cfg"]["model"]  # a legacy model's: every option fairseq-train parsed
    for key, value in config.options.items():
        if value is None:  # null: left out of the command
            continue
        parsed = fairseq_value(getattr(args, key.replace("-", "_")))
        if key == "arch":
            assert parsed == re.sub(r"_(small|base)$", "_tiny", value)
        elif key == "max-update":
            assert parsed == 1
        else:
            assert parsed == value or str(parsed) == str(value), key
    if config.options["waitk-lagging"] is None:  # an offline model
        assert run.waitk is None and not hasattr(args, "waitk_lagging")
        assert run.directory.name == f"{run.attn_type}_offline"
    else:
        assert run.waitk == config.options["waitk-lagging"] == args.waitk_lagging
    attn_type = config.options.get("encoder-attn-type", "leap")
    assert run.attn_type == attn_type == args.encoder_attn_type == args.cross_attn_type
    if config.recipe == "s2t train-st":
        assert args.encoder_initialized_from == str(
            run.directory.parent / f"asr_leap_k{run.waitk}" / "checkpoint_last.pt")


def test_speech_configs_follow_the_reference_recipe():
    """_base: d 256, 12 + 6 layers, 8 heads, pre-norm (the arch), wait-k on 360 ms units: 9
    encoder frames of 40 ms; _small: the _small arch; ST and ASR of one size share the model."""
    from fairseq.models import ARCH_CONFIG_REGISTRY

    for size in ("small", "base"):
        asr, st = load_config(f"s2t/asr_{size}"), load_config(f"s2t/st_{size}")
        assert asr.recipe == "s2t train-asr" and st.recipe == "s2t train-st"
        assert asr.options["arch"] == st.options["arch"] == f"leapformer_s2t_waitk_{size}"
        assert st.options["frames-per-unit"] == 9
    args = type("Args", (), {})()
    ARCH_CONFIG_REGISTRY["leapformer_s2t_waitk_base"](args)
    assert (args.encoder_embed_dim, args.encoder_layers, args.decoder_layers,
            args.encoder_attention_heads, args.encoder_normalize_before,
            args.decoder_normalize_before) == (256, 12, 6, 8, True, True)
    assert load_config("s2t/st_base").options["waitk-lagging"] == 5
    assert load_config("t2t/small").options["arch"] == "leapformer_waitk_transformer_small"
    assert load_config("t2t/base").options["arch"] == "leapformer_waitk_transformer_base"


def test_hydra_train_trains_the_same_model_from_a_run_record(trained, tmp_path):
    """fairseq-hydra-train on a run's hydra_train.yaml (our legacy models and fairseq's legacy
    speech_to_text task in it as fairseq converts them) trains exactly the recipe's model: the
    same weights after the same update, text and speech."""
    for name in ("t2t/small", "s2t/st_small"):
        run = trained(name)
        save = tmp_path / name.replace("/", "_")
        done = subprocess.run(
            [sys.executable, "-m", "fairseq_cli.hydra_train", "--config-dir", str(run.directory),
             "--config-name", "hydra_train", f"checkpoint.save_dir={save}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        expected = torch.load(run.directory / "checkpoint_last.pt", weights_only=False)["model"]
        weights = torch.load(save / "checkpoint_last.pt", weights_only=False)["model"]
        assert weights.keys() == expected.keys()
        for key, tensor in weights.items():
            assert torch.equal(tensor, expected[key]), (name, key)


# -------------------------------------------------------------------------- overrides
def text_config(data: Path, *arguments: str) -> TrainConfig:
    args = t2t.build_parser().parse_args(["train", "--data", str(data), *arguments])
    return config_from_arguments(args, "t2t train")


def test_overrides_apply_in_order_and_aliases_resolve_to_one_name(text_data):
    """configuration < its recipe's flags < --set < options after --; a later value wins over an
    alias of it set earlier, and the command and record carry the option's first name."""
    base = [text_data / "data-bin", "--user-dir", "leapformer_fairseq", "--task", "translation"]
    config = text_config(text_data, "--config", "t2t/demo", "--lr", "0.01", "--waitk", "5",
                         "--attn-type", "leap-softmax-leap", "--set", "lr=0.02",
                         "--set", "cross-attn-type=linear", "--set", "share-all-embeddings=false",
                         "--", "--lr", "0.03", "--clip-norm=2")
    resolved = resolve(config, base)
    assert resolved.options["lr"] == "0.03" and resolved.sources["lr"] == "after --: --lr"
    assert resolved.options["warmup-updates"] == 100  # t2t/demo over the t2t/small it extends
    assert resolved.sources["warmup-updates"] == str(CONFIGS / "t2t" / "demo.yaml")
    assert resolved.options["dropout"] == 0.1  # t2t/small's
    assert resolved.options["waitk-lagging"] == 5 and resolved.sources["waitk-lagging"] == \
        "--waitk 5"
    assert [resolved.options[f"{block}-attn-type"] for block in ("encoder", "decoder", "cross")] \
        == ["leap", "softmax", "linear"]
    assert (resolved.attn_type, resolved.waitk) == ("leap-softmax-linear", 5)
    command = resolved.command(Path("save"))
    assert command.count("--lr") == 1 and command[command.index("--lr") + 1] == "0.03"
    assert command[command.index("--clip-norm") + 1] == "2"
    assert "--share-all-embeddings" not in command  # false leaves a flag out
    assert list(resolved.options)[:2] == ["arch", "encoder-attn-type"]  # the file's order

    speech = s2t.build_parser().parse_args([
        "train-st", "--data", "d", "--config", "s2t/st_small", "--pre-decision-ratio", "4",
        "--set", "frames-per-unit=6", "--", "--fixed-pre-decision-ratio", "7"])
    resolved = resolve(config_from_arguments(speech, "s2t train-st", s2t.TRAIN_SHORTCUTS),
                       ["d", "--user-dir", "leapformer_fairseq", "--task", "speech_to_text"])
    assert resolved.options["frames-per-unit"] == "7"
    assert "fixed-pre-decision-ratio" not in resolved.options
    assert resolved.args.frames_per_unit == 7
    command = resolved.command(Path("save"))
    assert command.count("--frames-per-unit") == 1 and "--fixed-pre-decision-ratio" not in command


def test_a_run_records_its_configuration_and_trains_again_from_it(text_data, tmp_path):
    """Through the command: the run directory's config.yaml holds the resolved configuration
    (overrides included, one name per option) and the command; --config with that file gives
    the same command."""
    runs = {}
    for copy, arguments in (("first", ["--config", "t2t/small", "--arch",
                                       "leapformer_waitk_transformer_tiny", "--max-update", "1",
                                       "--cpu", "--set", "dropout=0.2", "--",
                                       "--label-smoothing", "0.2"]),
                            ("again", ["--config", str(tmp_path / "first" / "runs" / "leap_k3"
                                                       / "config.yaml")])):
        data = data_copy(text_data, tmp_path / copy)
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "t2t_recipe.py"), "train",
                               "--data", str(data), *arguments], capture_output=True, text=True,
                              timeout=300, env={**os.environ, **ENV})
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        runs[copy] = data / "runs" / "leap_k3"
    text = (runs["first"] / "config.yaml").read_text(encoding="utf-8")
    header, command = text.splitlines()[:2]
    assert header == ("# The configuration of this run: t2t/small with --arch "
                      "leapformer_waitk_transformer_tiny, --max-update 1, --cpu, --set "
                      "dropout=0.2, after --: --label-smoothing")
    record = yaml.safe_load(text)
    assert record["recipe"] == "t2t train"
    options = record["fairseq-train"]
    assert options == {**load_config("t2t/small").options, "arch":
                       "leapformer_waitk_transformer_tiny", "max-update": 1, "cpu": True,
                       "dropout": 0.2, "label-smoothing": "0.2"}
    model = torch.load(runs["first"] / "checkpoint_last.pt", weights_only=False)["cfg"]["model"]
    assert (model.dropout, model.label_smoothing) == (0.2, 0.2)
    again = (runs["again"] / "config.yaml").read_text(encoding="utf-8").splitlines()[1]
    assert again == command.replace(str(tmp_path / "first"), str(tmp_path / "again"))
    assert yaml.safe_load((runs["again"] / "config.yaml").read_text())["fairseq-train"] == options


# ------------------------------------------------------------------------------ errors
def train_refusal(data: Path, *arguments: str) -> str:
    return refusal(t2t.main, ["train", "--data", str(data), *map(str, arguments)])


def test_an_unknown_config_name_lists_the_available_ones(text_data, tmp_path):
    assert train_refusal(text_data, "--config", "t2t/smal") == (
        f"[t2t] train: --config t2t/smal: no configuration {CONFIGS / 't2t' / 'smal.yaml'}; "
        "available: t2t/base, t2t/demo, t2t/offline_screen, t2t/screen, t2t/small, "
        "t2t/small_prenorm")
    assert available("t2t train") == ["t2t/base", "t2t/demo", "t2t/offline_screen", "t2t/screen",
                                      "t2t/small", "t2t/small_prenorm"]
    missing = tmp_path / "mine.yaml"
    assert train_refusal(text_data, "--config", missing) == \
        f"[t2t] train: --config {missing}: no such file"
    assert refusal(s2t.main, ["train-asr", "--data", str(text_data), "--config",
                              "s2t/st_small"]) == (
        f"[s2t] train-asr: --config s2t/st_small: {CONFIGS / 's2t' / 'st_small.yaml'} is for "
        "'s2t train-st' (its recipe: key), not 's2t train-asr'")


@pytest.mark.parametrize("text, message", [
    ("recipe: t2t train\nfairseq-train:\n  lr: 0.1\n   max-update: 2\n",
     "not valid YAML (mapping values are not allowed here at line 4, column 14)"),
    ("- recipe\n", "a configuration is a mapping with the keys recipe, extends, fairseq-train; "
                   "this holds list"),
    ("recipe: t2t train\nwaitk: 3\n", "unknown key 'waitk' (a configuration holds recipe, "
                                      "extends, fairseq-train; fairseq-train options go under "
                                      "fairseq-train:)"),
    ("fairseq-train: {lr: 0.1}\n", "recipe: missing; one of t2t train, s2t train-asr, "
                                   "s2t train-st"),
    ("recipe: t2t train\nfairseq-train: [lr]\n",
     "fairseq-train: a mapping of fairseq-train options, got list"),
    ("recipe: t2t train\nfairseq-train:\n  adam-betas: {a: 1}\n",
     "adam-betas: a value is a number, a string, true, false, null or a list of numbers and "
     "strings; got {'a': 1}"),
    ("recipe: t2t train\nfairseq-train:\n  --lr: 0.1\n",
     "'--lr' is not a fairseq-train option name (the flag without its leading --, e.g. "
     "max-update)"),
    ("recipe: t2t train\nextends: t2t/nothing\n",
     f"extends: no configuration {CONFIGS / 't2t' / 'nothing.yaml'}; available: "
     f"{', '.join(CONFIG_NAMES)}"),
])
def test_a_bad_config_file_is_refused_naming_the_file_and_key(text_data, tmp_path, text,
                                                                message):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    assert train_refusal(text_data, "--config", path) == f"[t2t] train: {path}: {message}"


def test_a_config_extending_itself_is_refused(text_data, tmp_path):
    (tmp_path / "a.yaml").write_text("recipe: t2t train\nextends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    assert train_refusal(text_data, "--config", tmp_path / "a.yaml") == (
        f"[t2t] train: {tmp_path / 'a.yaml'}: extends itself (through {tmp_path / 'a.yaml'} -> "
        f"{tmp_path / 'b.yaml'})")


def test_unknown_options_and_bad_values_are_refused_naming_where_they_were_set(text_data,
                                                                               tmp_path):
    """Checked by fairseq-train's own parser (with the model's and task's options) before
    anything runs; nothing is written."""
    path = tmp_path / "mine.yaml"
    path.write_text("recipe: t2t train\nextends: t2t/small\nfairseq-train:\n  warmup: 100\n")
    context = "(with --arch leapformer_waitk_transformer_small and --task translation)"
    assert train_refusal(text_data, "--config", path) == \
        f"[t2t] train: {path}: fairseq-train has no option --warmup {context}"
    assert train_refusal(text_data, "--set", "frames-per-unit=4") == \
        f"[t2t] train: --set frames-per-unit=4: fairseq-train has no option --frames-per-unit " \
        f"{context}"
    assert train_refusal(text_data, "--", "--no-such-option") == \
        f"[t2t] train: after --: --no-such-option: fairseq-train has no option " \
        f"--no-such-option {context}"
    assert train_refusal(text_data, "--set", "encoder-attn-type=fast") == (
        "[t2t] train: --set encoder-attn-type=fast: fairseq-train refuses it: argument "
        "--encoder-attn-type: invalid choice: 'fast' (choose from "
        f"{', '.join(repr(t) for t in ATTN_TYPES)})")
    assert train_refusal(text_data, "--set", "lr") == \
        "[t2t] train: --set lr: expected KEY=VALUE (e.g. --set lr=0.0005)"
    assert train_refusal(text_data, "--", "0.1") == \
        "[t2t] train: after --: '0.1' is not an option (fairseq-train options start with --)"
    assert train_refusal(text_data, "--attn-type", "leap-fast") == (
        f"[t2t] train: --attn-type leap-fast: one of {', '.join(ATTN_TYPES)}, or three of them "
        "joined by - (encoder-decoder-cross, e.g. leap-leap-softmax)")
    assert train_refusal(text_data, "--set", "save-dir=elsewhere") == (
        "[t2t] train: --set save-dir=elsewhere: save-dir is set by the recipe (from --data and "
        "the step); leave it out")
    assert train_refusal(text_data, "--set", "waitk-lagging=null") == \
        "[t2t] train: --config t2t/small: no waitk-lagging (set it in the file, or --waitk)"
    assert train_refusal(text_data, "--set", "arch=null") == \
        "[t2t] train: --config t2t/small: no arch (set fairseq-train: arch: in the file, or --arch)"
    assert not (text_data / "runs").exists()


def test_a_config_error_through_the_command_is_one_line(text_data):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "t2t_recipe.py"), "train",
                           "--data", str(text_data), "--config", "t2t/smal"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "[t2t] train: --config t2t/smal: no configuration ")


def test_the_recipes_default_configs_exist_and_match_their_steps():
    for recipe, step, default in ((t2t, "train", "t2t/small"), (s2t, "train-asr", "s2t/asr_small"),
                                  (s2t, "train-st", "s2t/st_small")):
        args = recipe.build_parser().parse_args([step, "--data", "d"])
        assert args.config == default
        assert load_config(default).recipe == f"{recipe.__name__.rsplit('.', 1)[1]} {step}"
    assert available() == CONFIG_NAMES  # every training configuration under configs/ loads
