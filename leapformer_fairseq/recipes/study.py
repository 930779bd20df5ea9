"""Study runner: a grid of text-to-text wait-k training runs from one study file, their
SimulEval evaluation, and one table (docs/quality.md).

    python scripts/study.py run studies/t2t_screen_en_de --jobs 2
    python scripts/study.py evaluate studies/t2t_screen_en_de --rows leap --sentences 100
    python scripts/study.py table studies/t2t_screen_en_de

A study file is a configuration (``configs/``, docs/recipes.md) with ``recipe: t2t study`` and
one more key, ``study:``. Its ``extends:`` is the base training configuration and its
``fairseq-train:`` the options every run shares (the budget); ``study:`` names the prepared data,
the seeds, the wait-k values (a multi-path set such as ``1-9`` too: one model evaluated at every
k of it), the rows (row name -> fairseq-train options over the base) and the reference row.
Every row x k x seed is one fairseq-train run in ``OUT/<row>/k<k>_seed<s>/``,
with the recipes' run record (``config.yaml``) and the runner's (``run.json``). ``run`` trains
(finished runs are skipped, partial ones refused unless ``--resume``) and records validation
loss; ``evaluate`` runs SimulEval with the text agent on chosen rows and the reference; both,
and ``table``, write ``OUT/results.{md,json}`` (and ``OUT/bleu_vs_al.png`` once evaluated).
"""
import argparse
import copy
import json
import logging
import math
import os
import platform
import queue
import re
import shlex
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from leapformer_fairseq.recipes import t2t
from leapformer_fairseq.recipes.common import (
    FAIRSEQ_TRAIN,
    PLUGIN,
    ROOT,
    Recipe,
    atomic_output,
    skipped_samples,
    write_text,
)
from leapformer_fairseq.recipes.config import (
    CONFIGS,
    RESUMABLE,
    ConfigError,
    Resolved,
    TrainConfig,
    attention_types,
    built_options,
    changed_options,
    check_option,
    config_path,
    load_checkpoint,
    load_file,
    parse_set,
    plain,
    quiet_hydra,
    resolve,
    saved_value,
    trained_options,
    unwrap,
    write_run_record,
)

RECIPE = Recipe("study")
log = RECIPE.log
STUDY_RECIPE = "t2t study"
STUDY_KEYS = ("data", "out", "seeds", "waitk", "reference", "rows", "simuleval")
# fairseq-train options the runner sets for every run itself: the grid and the device
GRID_KEYS = {"seed": "study: seeds", "waitk-lagging": "study: waitk", "cpu": "the runner's device"}
# flags the runner gives SimulEval itself (t2t.simuleval_command and t2t.SCORING)
SIMULEVAL_KEYS = ("agent", "source", "target", "checkpoint", "data-bin", "spm", "waitk", "output",
                  "source-type", "target-type", "quality-metrics", "latency-metrics",
                  "eval-latency-unit", "no-scoring", "computation-aware")
ROW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
VALID_LINE = re.compile(r"\| valid on '([^']+)' subset \| loss (\S+) .*?\| num_updates (\d+)")
METRICS = ("BLEU", "AL", "LAAL", "AP", "DAL")
BOOTSTRAP_SAMPLES = 1000  # sacrebleu's default for the paired bootstrap


# -------------------------------------------------------------------------------- study file
@dataclass
class Study:
    """A study file: ``config`` is its base configuration with the shared options, ``rows``
    each row's options (``attn-type`` expanded to the three blocks) in the file's order."""

    path: Path
    config: TrainConfig
    base: Optional[str]
    data: Optional[str]
    out: Optional[str]
    seeds: List[int]
    waitks: List[Union[int, str]]  # a training k, or a multi-path set ("1-9")
    reference: str
    rows: Dict[str, List[Tuple[str, Any]]]
    simuleval: List[str]

    @property
    def name(self) -> str:
        return self.path.stem


def available_studies() -> List[str]:
    return sorted(path.relative_to(CONFIGS).with_suffix("").as_posix()
                  for path in (CONFIGS / "studies").glob("*.yaml"))


def load_study(name: str) -> Study:
    """The study file ``name`` (a name under ``configs/``, e.g. ``studies/t2t_screen_en_de``,
    or a ``.yaml`` path); every problem is a :class:`ConfigError` naming the file and key."""
    path = config_path(name).absolute()
    if not path.is_file():
        if name.endswith((".yaml", ".yml")):
            raise ConfigError(f"{name}: no such study file")
        raise ConfigError(f"{name}: no study file {path}; available: "
                          f"{', '.join(available_studies()) or 'none'}")
    config = load_file(path, ("study",))
    if config.recipe != STUDY_RECIPE:
        raise ConfigError(f"{path}: recipe: {config.recipe or 'missing'}; a study file says "
                          f"recipe: {STUDY_RECIPE} (and extends: its base configuration)")
    for key, source in config.sources.items():
        if key in GRID_KEYS and source == str(path):
            raise ConfigError(f"{path}: fairseq-train: {key} is set for every run by "
                              f"{GRID_KEYS[key]}; leave it out")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    section = data.get("study")
    where = f"{path}: study"
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: a mapping with the keys {', '.join(STUDY_KEYS)}; got "
                          f"{type(section).__name__}")
    unknown = [key for key in section if key not in STUDY_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (a study holds "
                          f"{', '.join(STUDY_KEYS)})")
    for key in ("seeds", "waitk", "reference", "rows"):
        if section.get(key) in (None, [], {}):
            raise ConfigError(f"{where}: no {key} ({STUDY_HELP[key]})")
    rows = read_rows(section["rows"], path)
    reference = section["reference"]
    if reference not in rows:
        raise ConfigError(f"{where}: reference: '{reference}' is not a row (rows: "
                          f"{', '.join(rows)})")
    for key in ("data", "out"):
        if section.get(key) is not None and not isinstance(section[key], str):
            raise ConfigError(f"{where}: {key}: a directory, got {section[key]!r}")
    return Study(path=path, config=config, base=data.get("extends"), data=section.get("data"),
                 out=section.get("out"), seeds=integers(section["seeds"], f"{where}: seeds", 0),
                 waitks=waitk_values(section["waitk"], f"{where}: waitk"), reference=reference,
                 rows=rows, simuleval=simuleval_flags(section.get("simuleval"), path))


STUDY_HELP = {
    "seeds": "the seeds of every row, e.g. seeds: [1, 2, 3]",
    "waitk": "the wait-k values of every row, e.g. waitk: [3], or a multi-path set, "
             "waitk: [3, 1-9]",
    "reference": "the row the others are compared with, e.g. reference: softmax",
    "rows": "row name -> the fairseq-train options it sets over the base, e.g. leap: "
            "{attn-type: leap}",
}


def integers(value: Any, where: str, least: int) -> List[int]:
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= least for v in values):
        raise ConfigError(f"{where}: integers >= {least} (one or a list), got {value!r}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{where}: {value!r} repeats a value")
    return values


def waitk_values(value: Any, where: str) -> List[Union[int, str]]:
    """``study: waitk``: integers >= 1 and multi-path sets (``1-9``, ``1,3,5``: one model
    trained for all of them, evaluated at each), as ``--waitk-lagging`` takes them; a quoted
    single k (``"3"``) is the integer."""
    from leapformer_fairseq.models.leapformer_transformer import waitk_lags

    values = []
    for v in value if isinstance(value, list) else [value]:
        try:
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise ValueError
            lags = waitk_lags(v)
        except ValueError:
            raise ConfigError(f"{where}: integers >= 1 or multi-path sets such as 1-9 (one or a "
                              f"list), got {value!r}") from None
        values.append(lags[0] if len(lags) == 1 else v)
    if len(set(values)) != len(values):
        raise ConfigError(f"{where}: {value!r} repeats a value")
    return values


def evaluation_lags(waitk: Union[int, str]) -> List[int]:
    """The k values a run trained with ``waitk`` is evaluated at: its own, or every k of a
    multi-path set."""
    from leapformer_fairseq.models.leapformer_transformer import waitk_lags

    return list(waitk_lags(waitk))


def read_rows(rows: Any, path: Path) -> Dict[str, List[Tuple[str, Any]]]:
    if not isinstance(rows, dict):
        raise ConfigError(f"{path}: study: rows: a mapping of row name -> fairseq-train options, "
                          f"got {type(rows).__name__}")
    result = {}
    for name, options in rows.items():
        where = f"{path}: rows: {name}"
        if not isinstance(name, str) or not ROW_NAME.fullmatch(name):
            raise ConfigError(f"{where}: a row name is letters, digits and _ . + - (it names the "
                              "row's directory)")
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise ConfigError(f"{where}: a mapping of fairseq-train options, got "
                              f"{type(options).__name__}")
        result[name] = []
        for key, value in options.items():
            key = str(key)
            if key in GRID_KEYS:
                raise ConfigError(f"{where}: {key} is set for every run by {GRID_KEYS[key]}; "
                                  "leave it out")
            if key == "attn-type":
                try:
                    types = attention_types(str(value))
                except ConfigError as error:
                    message = str(error).replace(f"--attn-type {value}",
                                                 f"{where}: attn-type {value}", 1)
                    raise ConfigError(message) from None
                result[name] += list(zip(("encoder-attn-type", "decoder-attn-type",
                                          "cross-attn-type"), types))
                continue
            check_option(key, value, where)
            result[name].append((key, value))
    return result


def simuleval_flags(options: Any, path: Path) -> List[str]:
    """``study: simuleval:`` (agent and SimulEval flags -> values) as command-line flags."""
    if options is None:
        return []
    where = f"{path}: study: simuleval"
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: a mapping of SimulEval and agent flags (without --), got "
                          f"{type(options).__name__}")
    flags: List[str] = []
    for key, value in options.items():
        key = str(key)
        if key in SIMULEVAL_KEYS:
            raise ConfigError(f"{where}: {key} is set by the runner; leave it out")
        check_option(key, value, where)
        if value is None or value is False:
            continue
        flags.append(f"--{key}")
        if value is not True:
            flags += [str(v) for v in (value if isinstance(value, list) else [value])]
    return flags


# -------------------------------------------------------------------------------- the grid
@dataclass
class GridRun:
    row: str
    waitk: Union[int, str]  # the training k, or a multi-path set
    seed: int
    directory: Path
    resolved: Optional[Resolved] = None
    state: str = "new"
    updates: Optional[int] = None

    @property
    def label(self) -> str:
        return f"{self.row} k{self.waitk} seed {self.seed}"


def run_directory(out: Path, row: str, waitk: Union[int, str], seed: int) -> Path:
    return out / row / f"k{waitk}_seed{seed}"


def grid(study: Study, out: Path, rows: Sequence[str],
         seeds: Optional[Sequence[int]] = None) -> List[GridRun]:
    """Every row x k x seed of ``rows`` (and of ``seeds``, default the study's)."""
    return [GridRun(row, waitk, seed, run_directory(out, row, waitk, seed))
            for row in rows for waitk in study.waitks for seed in seeds or study.seeds]


def resolve_run(study: Study, run: GridRun, data: Path, overrides: Sequence[Tuple[str, Any, str]],
                cpu: Tuple[bool, str]) -> Resolved:
    """The run's configuration: the base with the study's shared options, the row's options,
    ``--set`` overrides, then its k, seed and device; checked by fairseq-train's parser."""
    config = copy.deepcopy(study.config)
    config.recipe, config.name = "t2t train", str(study.path)
    for key, value in study.rows[run.row]:
        config.set(key, value, f"{study.path}: rows: {run.row}")
    for key, value, source in overrides:
        config.set(key, value, source)
    config.set("waitk-lagging", run.waitk, f"study: waitk {run.waitk}")
    config.set("seed", run.seed, f"study: seed {run.seed}")
    config.set("cpu", cpu[0], cpu[1])
    return resolve(config, [data / "data-bin", "--user-dir", PLUGIN, "--task", "translation"])


def output_directory(study: Study, args) -> Path:
    """``--out`` (relative to the working directory), else the study file's ``out:`` (relative
    to the repository), else ``work/studies/<study name>`` in the repository."""
    if args.out:
        return Path(args.out).absolute()
    return ROOT / (study.out or f"work/studies/{study.name}")


def data_directory(study: Study, args) -> Path:
    """``--data`` (relative to the working directory), else the study file's ``data:``
    (relative to the repository); refused unless ``prepare`` made its ``data-bin``."""
    if args.data:
        data = Path(args.data).absolute()
    elif study.data:
        data = ROOT / study.data
    else:
        raise RECIPE.fail(f"{args.command}: no data directory: set study: data: in {study.path} "
                          "or pass --data")
    if not (data / "data-bin").is_dir():
        where = f"--data {args.data}" if getattr(args, "data", None) else \
            f"study: data: in {study.path}"
        raise RECIPE.fail(f"{args.command}: {data / 'data-bin'} not found ({where}); run "
                          f"scripts/t2t_recipe.py prepare --out {data} first")
    return data


def chosen_rows(study: Study, text: Optional[str], command: str, flag: str = "--rows"
                ) -> List[str]:
    if not text:
        return list(study.rows)
    rows = [row.strip() for row in text.split(",") if row.strip()]
    for row in rows:
        if row not in study.rows:
            raise RECIPE.fail(f"{command}: {flag} {text}: '{row}' is not a row of {study.path} "
                              f"(rows: {', '.join(study.rows)})")
    return rows


def chosen_seeds(study: Study, text: Optional[str], command: str, flag: str = "--seeds"
                 ) -> List[int]:
    if not text:
        return list(study.seeds)
    seeds = []
    for part in (part.strip() for part in text.split(",") if part.strip()):
        if not part.isdigit() or int(part) not in study.seeds:
            raise RECIPE.fail(f"{command}: {flag} {text}: '{part}' is not a seed of "
                              f"{study.path} (seeds: {', '.join(map(str, study.seeds))})")
        seeds.append(int(part))
    return seeds


# ------------------------------------------------------------------------------ the device
@dataclass
class Device:
    """Where the trainings run: ``cuda`` (``gpus``: the visible devices, runs spread over them)
    or ``cpu`` (``threads`` torch threads per run)."""

    kind: str
    name: str
    gpus: List[str] = field(default_factory=list)
    cores: int = 1
    threads: Optional[int] = None

    def environment(self, slot: int) -> Dict[str, str]:
        env = dict(os.environ)
        if self.kind == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        else:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env

    def record(self, slot: int, jobs: int) -> Dict[str, Any]:
        if self.kind == "cuda":
            return {"kind": "cuda", "name": self.name, "gpu": self.gpus[slot % len(self.gpus)],
                    "runs_at_once": jobs}
        return {"kind": "cpu", "name": self.name, "cores": self.cores,
                "threads_per_run": self.threads, "runs_at_once": jobs}


def describe(device: Dict[str, Any]) -> str:
    if device["kind"] == "unrecorded":
        return "not recorded (adopted run)"
    if device["kind"] == "cuda":
        return f"{device['name']} (GPU {device['gpu']}, {device['runs_at_once']} run(s) at once)"
    return (f"CPU {device['name']} ({device['cores']} cores, {device['threads_per_run']} "
            f"thread(s) per run, {device['runs_at_once']} run(s) at once)")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def find_device(force_cpu: bool, jobs: int) -> Device:
    """CUDA when torch sees it (unless ``force_cpu``), else the CPU; on the CPU each of the
    ``jobs`` runs gets ``OMP_NUM_THREADS`` threads (the environment's, else cores // jobs)."""
    import torch

    if not force_cpu and torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible else \
            [str(i) for i in range(torch.cuda.device_count())]
        return Device("cuda", torch.cuda.get_device_name(0), gpus=gpus)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, cores // jobs))
    return Device("cpu", cpu_name(), cores=cores, threads=threads)


# --------------------------------------------------------------------------------- records
def read_json(path: Path) -> Optional[Dict]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def checkpoint_updates(path: Path) -> int:
    try:
        state = load_checkpoint(path)
    except ConfigError as error:
        raise RECIPE.fail(str(error)) from None
    try:
        return int(state["optimizer_history"][-1]["num_updates"])
    except (KeyError, IndexError, TypeError) as error:  # loads, but records no updates
        raise RECIPE.fail(f"{path}: not a readable fairseq checkpoint "
                          f"({type(error).__name__}: {error})") from None


def fingerprint(path: Path) -> Dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def train_logs(directory: Path) -> List[Path]:
    """``train.log`` of every session, oldest first (``train.N.log`` are the earlier ones)."""
    earlier = sorted(directory.glob("train.*.log"), key=lambda p: int(p.name.split(".")[1]))
    return [*earlier, directory / "train.log"]


def validation_curve(directory: Path, subset: str) -> List[List[float]]:
    """``[updates, loss]`` of every validation fairseq logged on ``subset``, over all sessions
    (a validation repeated at the same update after a resume counts once, the later one)."""
    curve: Dict[int, float] = {}
    for path in train_logs(directory):
        if path.is_file():
            for match in VALID_LINE.finditer(path.read_text(encoding="utf-8", errors="replace")):
                if match[1] == subset:
                    curve[int(match[3])] = float(match[2])
    return [[updates, loss] for updates, loss in sorted(curve.items())]


def summarise(directory: Path, record: Dict) -> None:
    """Updates, validation losses and skipped samples of a run, into its ``record``."""
    checkpoint = directory / "checkpoint_last.pt"
    record["updates"] = checkpoint_updates(checkpoint) if checkpoint.is_file() else 0
    curve = validation_curve(directory, record["valid_subset"])
    record["valid_curve"] = curve
    record["valid_loss"] = curve[-1][1] if curve else None
    record["best_valid_loss"] = min(loss for _, loss in curve) if curve else None
    log_file = directory / "train.log"
    record["skipped"] = {subset: count for subset, (count, _) in
                         skipped_samples(log_file).items()} if log_file.is_file() else {}
    record["train_seconds"] = round(sum(s.get("seconds") or 0 for s in record["sessions"]), 1)
    record["finished"] = finished(record["updates"], record["max_update"], record["sessions"])


def finished(updates: int, max_update: int, sessions: List[Dict]) -> bool:
    """A run is finished once its checkpoint_last.pt is at ``max-update``; without a
    max-update, once fairseq-train ended without an error."""
    if max_update > 0:
        return updates >= max_update
    return bool(sessions) and sessions[-1].get("exit_code") == 0


def differences(record: Dict, resolved: Resolved, data: Path) -> List[str]:
    """How ``resolved`` differs from the run recorded in ``record`` (its data and its options as
    fairseq-train parsed them), leaving out what may change between sessions (RESUMABLE). An
    option recorded unset before its default changed counts as its old default
    (:func:`saved_value`)."""
    found = []
    if record.get("data") != str(data):
        found.append(f"data: {record.get('data')} there, {data} now")
    recorded_args, current_args = record.get("args", {}), plain(vars(resolved.args))
    recorded_options = record.get("options", {})
    for key in dict.fromkeys([*recorded_options, *resolved.options]):
        dest = key.replace("-", "_")
        if dest in RESUMABLE:
            continue
        if dest in recorded_args and dest in current_args:
            before, now = saved_value(recorded_args, dest), current_args[dest]
        else:
            before, now = recorded_options.get(key), plain(resolved.options.get(key))
        if before != now:
            found.append(f"{key}: {unwrap(before)} there, {unwrap(now)} now")
    return found


def plan(study: Study, runs: List[GridRun], data: Path, overrides, cpu, resume: bool) -> None:
    """Resolve every run and find its state (new, finished, partial), refusing before anything
    runs: a run directory holding another run, a finished run past the budget, a partial run
    without ``--resume``."""
    for run in runs:
        try:
            run.resolved = resolve_run(study, run, data, overrides, cpu)
        except ConfigError as error:
            raise RECIPE.fail(f"run: {error}") from None
    for run in runs:
        record = read_json(run.directory / "run.json")
        if record is None:
            if run.directory.exists() and any(run.directory.iterdir()):
                raise RECIPE.fail(f"run: {run.directory} exists but holds no run record "
                                  "(run.json); delete it or choose another --out")
            continue
        found = differences(record, run.resolved, data)
        if found:
            raise RECIPE.fail(f"run: {run.directory} holds a run with other options ("
                              f"{'; '.join(found[:3])}{'; ...' if len(found) > 3 else ''}); "
                              "delete it or choose another --out")
        max_update = run.resolved.args.max_update
        checkpoint = run.directory / "checkpoint_last.pt"
        run.updates = checkpoint_updates(checkpoint) if checkpoint.is_file() else 0
        if max_update > 0 and run.updates > max_update:
            raise RECIPE.fail(f"run: {checkpoint} is at {run.updates} updates, past the "
                              f"max-update {max_update} the study now sets; choose another --out")
        run.state = "finished" if finished(run.updates, max_update, record.get("sessions", [])) \
            else "partial"
    partial = [run for run in runs if run.state == "partial"]
    if partial and not resume:
        run = partial[0]
        raise RECIPE.fail(
            f"run: {run.directory} is partial (checkpoint_last.pt at {run.updates} of "
            f"{run.resolved.args.max_update} updates)"
            + (f", and {len(partial) - 1} more run(s)" if len(partial) > 1 else "")
            + "; --resume continues partial runs from their checkpoint_last.pt, or delete them")


# -------------------------------------------------------------------------------- training
def parallel(items: Sequence, jobs: int, function: Callable[[Any, int], None]) -> List[str]:
    """``function(item, slot)`` for every item, ``jobs`` at a time (``slot`` in 0..jobs-1 is
    free for the call's duration: the GPU it uses); returns the messages of those that
    failed."""
    slots: "queue.Queue[int]" = queue.Queue()
    for slot in range(jobs):
        slots.put(slot)

    def work(item):
        slot = slots.get()
        try:
            function(item, slot)
        finally:
            slots.put(slot)

    failures = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(work, item) for item in items]
        for future in futures:
            try:
                future.result()
            except SystemExit as error:
                failures.append(str(error.code))
    return failures


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def train(run: GridRun, data: Path, device: Device, slot: int, jobs: int, position: str) -> None:
    """fairseq-train of one run in its directory (log: ``train.log``; a resumed run's earlier
    logs are kept as ``train.N.log``), recorded in ``run.json``."""
    directory, resolved = run.directory, run.resolved
    directory.mkdir(parents=True, exist_ok=True)
    command = resolved.command(directory)
    with quiet_hydra():
        write_run_record(directory, resolved, command)
    record = read_json(directory / "run.json") or {
        "row": run.row, "waitk": run.waitk, "seed": run.seed, "sessions": []}
    log_file = directory / "train.log"
    if log_file.exists():
        os.replace(log_file, directory / f"train.{len(train_logs(directory))}.log")
    full = [str(c) for c in [*FAIRSEQ_TRAIN, *command]]
    session = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device.record(slot, jobs),
               "from_updates": run.updates or 0, "command": shlex.join(full)}
    record.update({"data": str(data), "options": plain(resolved.options),
                   "args": plain(vars(resolved.args)), "max_update": resolved.args.max_update,
                   "valid_subset": resolved.args.valid_subset.split(",")[0]})
    record["sessions"].append(session)
    write_json(directory / "run.json", record)
    log(f"{position} start {run.label}" + (f" (resuming at {run.updates} updates)"
                                            if run.updates else "")
        + f" on {describe(session['device'])}: {log_file}")
    start = time.monotonic()
    with open(log_file, "wb") as output:
        returncode = subprocess.run(full, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                    env=device.environment(slot)).returncode
    session.update(seconds=round(time.monotonic() - start, 1), exit_code=returncode)
    summarise(directory, record)
    write_json(directory / "run.json", record)
    if returncode != 0:
        raise RECIPE.fail(f"{run.label}: fairseq-train failed (exit code {returncode}); its "
                          f"output is in {log_file}")
    skipped = ", ".join(f"{count} {subset}" for subset, count in record["skipped"].items())
    log(f"{position} done {run.label}: {record['updates']} updates, valid loss "
        f"{fmt(record['valid_loss'], 3)} (best {fmt(record['best_valid_loss'], 3)}), "
        f"{duration(session['seconds'])}"
        + (f"; skipped {skipped} sample(s) over max positions" if skipped else ""))


def run_command(args) -> None:
    study = load(args)
    data, out = data_directory(study, args), output_directory(study, args)
    if args.jobs < 1:
        raise RECIPE.fail(f"run: --jobs must be >= 1, got {args.jobs}")
    overrides = []
    for text in args.set:
        try:
            key, value = parse_set(text)
        except ConfigError as error:
            raise RECIPE.fail(f"run: {error}") from None
        if key in GRID_KEYS:
            raise RECIPE.fail(f"run: --set {text}: {key} is set for every run by "
                              f"{GRID_KEYS[key]}; leave it out")
        overrides.append((key, value, f"--set {text}"))
    device = find_device(args.cpu, args.jobs)
    cpu = (True, "--cpu" if args.cpu else "the runner: no CUDA") if device.kind == "cpu" else \
        (False, "the runner: CUDA")
    runs = grid(study, out, chosen_rows(study, args.rows, "run"),
                chosen_seeds(study, args.seeds, "run"))
    plan(study, runs, data, overrides, cpu, args.resume)
    to_train = [run for run in runs if run.state != "finished"]
    for run in runs:
        if run.state == "finished":
            log(f"skip {run.label}: finished ({run.updates} updates) in {run.directory}")
    log(f"run: {len(to_train)} of {len(runs)} run(s) to train, {args.jobs} at a time, on "
        f"{describe(device.record(0, args.jobs))}; output in {out}")
    if args.dry_run:
        for run in to_train:
            log(f"would {'resume' if run.state == 'partial' else 'start'} {run.label}: "
                f"{run.directory}")
        return
    record_command(out, args)
    total = len(to_train)
    positions = {id(run): f"[{number}/{total}]" for number, run in enumerate(to_train, 1)}
    failures = parallel(to_train, args.jobs, lambda run, slot: train(
        run, data, device, slot, args.jobs, positions[id(run)]))
    write_table(study, out, None)
    if failures:
        raise RECIPE.fail(f"run: {len(failures)} of {total} run(s) failed: "
                          + " | ".join(f.removeprefix("[study] ") for f in failures))


# -------------------------------------------------------------------------- adopting a run
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \|", re.MULTILINE)


def log_seconds(log_file: Path) -> Optional[float]:
    """Seconds between the first and the last time-stamped line of a fairseq-train log."""
    if not log_file.is_file():
        return None
    stamps = LOG_TIME.findall(log_file.read_text(encoding="utf-8", errors="replace"))
    if not stamps:
        return None
    first, last = (time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))
                   for stamp in (stamps[0], stamps[-1]))
    return last - first


def adopt_command(args) -> None:
    """Take a finished run trained outside the study (``t2t_recipe.py train``, another study) as
    one of its runs, once its checkpoint's options equal those the study gives the run."""
    study = load(args)
    data, out = data_directory(study, args), output_directory(study, args)
    row = chosen_rows(study, args.row, "adopt", "--row")
    seed = chosen_seeds(study, args.seed, "adopt", "--seed")
    if len(row) != 1 or len(seed) != 1:
        raise RECIPE.fail(f"adopt: --row and --seed name one run; got --row {args.row} --seed "
                          f"{args.seed}")
    if args.waitk is None and len(study.waitks) > 1:
        raise RECIPE.fail(f"adopt: {study.path} trains several k "
                          f"({', '.join(map(str, study.waitks))}); choose one with --waitk")
    waitk = study.waitks[0] if args.waitk is None else \
        next((k for k in study.waitks if str(k) == args.waitk), None)
    if waitk is None:
        raise RECIPE.fail(f"adopt: --waitk {args.waitk} is not a k of {study.path} (waitk: "
                          f"{', '.join(map(str, study.waitks))})")
    run = GridRun(row[0], waitk, seed[0], run_directory(out, row[0], waitk, seed[0]))
    source = Path(args.source).absolute()
    checkpoint = source / "checkpoint_last.pt"
    if not checkpoint.is_file():
        raise RECIPE.fail(f"adopt: --from {args.source}: no checkpoint_last.pt in {source}")
    if run.directory.exists() and any(run.directory.iterdir()):
        raise RECIPE.fail(f"adopt: {run.directory} already holds a run; delete it first")
    try:
        run.resolved = resolve_run(study, run, data, [], (True, "adopt"))
    except ConfigError as error:
        raise RECIPE.fail(f"adopt: {error}") from None
    try:
        trained = trained_options(checkpoint)
    except ConfigError as error:
        raise RECIPE.fail(str(error)) from None
    if trained is None:
        raise RECIPE.fail(f"adopt: {checkpoint} records no fairseq-train options (cfg.model); "
                          "only runs of this plugin's archs can be adopted")
    # the options a resume may change may differ (RESUMABLE); the data is compared as a path,
    # the budget below (the checkpoint must be at max-update)
    found = [f"{name}: {before} there, {after} in the study"
             for name, before, after in changed_options(trained, built_options(run.resolved.args))]
    there = Path(trained.get("data") or "")
    if (there if there.is_absolute() else ROOT / there).resolve() != (data / "data-bin").resolve():
        found.insert(0, f"data: {trained.get('data')} there, {data / 'data-bin'} in the study")
    if found:
        raise RECIPE.fail(f"adopt: {checkpoint} was trained with other options than {run.label}"
                          f" of {study.path} ({'; '.join(found[:3])}"
                          f"{'; ...' if len(found) > 3 else ''})")
    updates, max_update = checkpoint_updates(checkpoint), run.resolved.args.max_update
    if updates != max_update:
        raise RECIPE.fail(f"adopt: {checkpoint} is at {updates} updates; the study trains "
                          f"{run.label} to max-update {max_update}")
    run.directory.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):  # copies: fairseq-train rewrites checkpoints in place
        if path.is_file() and path.name != "run.json":
            shutil.copy2(path, run.directory / path.name)
    header = (source / "config.yaml").read_text(encoding="utf-8").splitlines()[1:2] \
        if (source / "config.yaml").is_file() else []
    session = {"started": None, "device": {"kind": "unrecorded"}, "from_updates": 0,
               "command": header[0].removeprefix("# ") if header else None,
               "adopted_from": str(source), "seconds": log_seconds(source / "train.log"),
               "exit_code": 0}
    record = {"row": run.row, "waitk": run.waitk, "seed": run.seed, "sessions": [session],
              "data": str(data), "options": plain(run.resolved.options),
              "args": plain(vars(run.resolved.args)),
              "max_update": max_update,
              "valid_subset": run.resolved.args.valid_subset.split(",")[0]}
    summarise(run.directory, record)
    record_command(out, args)
    write_json(run.directory / "run.json", record)
    write_table(study, out, None)
    log(f"adopt: {run.label} from {source} ({updates} updates, valid loss "
        f"{fmt(record['valid_loss'], 3)}) in {run.directory}")


# ------------------------------------------------------------------------------ evaluation
def evaluation_directory(run: GridRun, checkpoint: str, sentences: int, waitk: int) -> Path:
    """``RUN/eval_<checkpoint>_<N or all>``; a multi-path run's evaluation at k adds ``_k<k>``."""
    name = f"eval_{Path(checkpoint).stem}_{sentences or 'all'}"
    return run.directory / (name if waitk == run.waitk else f"{name}_k{waitk}")


def evaluate_run(run: GridRun, waitk: int, study: Study, data: Path, settings: Dict,
                 position: str) -> None:
    """SimulEval of ``run``'s checkpoint at ``waitk``, recorded in its evaluation directory."""
    checkpoint = run.directory / settings["checkpoint"]
    output = evaluation_directory(run, settings["checkpoint"], settings["sentences"], waitk)
    label = run.label if waitk == run.waitk else f"{run.label} at k{waitk}"
    record_path = output / "eval.json"
    record = read_json(record_path)
    if record and record.get("fingerprint") == fingerprint(checkpoint) and \
            record.get("simuleval") == study.simuleval:
        log(f"{position} skip {label}: evaluated ({output})")
        return
    record_path.unlink(missing_ok=True)
    what = f"simuleval {label}"
    command = t2t.simuleval_command(data, checkpoint, output, waitk, settings["sentences"],
                                    study.simuleval, RECIPE)
    start = time.monotonic()  # the start line: the command, logged by Recipe.run
    scores = RECIPE.simuleval(command, t2t.SCORING, output, f"{position} {what}", quiet=True)
    seconds = round(time.monotonic() - start, 1)
    flags = study.simuleval
    write_json(record_path, {
        "checkpoint": str(checkpoint), "fingerprint": fingerprint(checkpoint),
        "updates": checkpoint_updates(checkpoint), "sentences": settings["sentences"],
        "waitk": waitk, "simuleval": flags, "scores": scores, "seconds": seconds,
        "device": flags[flags.index("--device") + 1] if "--device" in flags else "cpu",
        "agent_threads": int(flags[flags.index("--threads") + 1]) if "--threads" in flags
        else 1, "command": shlex.join([str(c) for c in [*command, *t2t.SCORING,
                                                          "--no-scoring"]])})
    log(f"{position} done {what}: BLEU {scores['BLEU']:.2f}, AL {scores['AL']:.2f}, LAAL "
        f"{scores['LAAL']:.2f}, {duration(seconds)}")


def evaluate_command(args) -> None:
    study = load(args)
    data, out = data_directory(study, args), output_directory(study, args)
    if args.jobs < 1:
        raise RECIPE.fail(f"evaluate: --jobs must be >= 1, got {args.jobs}")
    rows = chosen_rows(study, args.rows, "evaluate")
    if study.reference not in rows:
        rows.append(study.reference)
    runs = grid(study, out, rows, chosen_seeds(study, args.seeds, "evaluate"))
    for run in runs:
        record = read_json(run.directory / "run.json")
        checkpoint = run.directory / args.checkpoint_name
        if record is None or not checkpoint.is_file():
            raise RECIPE.fail(f"evaluate: missing {checkpoint}; train it first: scripts/study.py "
                              f"run {args.study} --rows {run.row}")
        if not record.get("finished"):
            raise RECIPE.fail(f"evaluate: {run.directory} is not finished ({record.get('updates')}"
                              f" of {record.get('max_update')} updates); finish it first: "
                              f"scripts/study.py run {args.study} --resume")
    settings = {"checkpoint": args.checkpoint_name, "sentences": args.sentences}
    record_command(out, args)
    write_json(out / "evaluation.json", settings)
    pairs = [(run, waitk) for run in runs for waitk in evaluation_lags(run.waitk)]
    items = [(f"[{number}/{len(pairs)}]", run, waitk)
             for number, (run, waitk) in enumerate(pairs, 1)]
    log(f"evaluate: {len(items)} evaluation(s) of {len(runs)} run(s) ({', '.join(rows)}), "
        f"{args.jobs} at a time, {args.sentences or 'all'} test sentence(s), "
        f"{args.checkpoint_name}")
    failures = parallel(items, args.jobs, lambda item, slot: evaluate_run(
        item[1], item[2], study, data, settings, item[0]))
    write_table(study, out, settings)
    if failures:
        raise RECIPE.fail(f"evaluate: {len(failures)} of {len(items)} evaluation(s) failed: "
                          + " | ".join(f.removeprefix("[study] ") for f in failures))


# ----------------------------------------------------------------------------------- table
def read_instances(output: Path) -> Dict[int, Dict]:
    records = [json.loads(line) for line in
               (output / "instances.log").read_text(encoding="utf-8").splitlines() if line.strip()]
    return {record["index"]: record for record in records}


def paired_bootstrap(reference: Path, system: Path, tokenizer: str) -> Dict[str, float]:
    """sacrebleu's paired bootstrap (``PairedTest``, ``bs``, 1,000 resamples, its fixed seed)
    of the SimulEval run in ``system`` against the one in ``reference``: the hypotheses are the
    ``prediction`` of every instance in ``instances.log``, the strings SimulEval's BLEU scores.
    Returns both BLEU scores and the p-value (1 where the two scores are equal)."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    baseline, other = read_instances(reference), read_instances(system)
    if sorted(baseline) != sorted(other) or any(
            baseline[i]["reference"] != other[i]["reference"] for i in baseline):
        raise RECIPE.fail(f"table: {reference} and {system} hold different test sentences")
    indices = sorted(baseline)
    references = [[baseline[i]["reference"] for i in indices]]
    test = PairedTest([("reference", [baseline[i]["prediction"] for i in indices]),
                       ("system", [other[i]["prediction"] for i in indices])],
                      {"BLEU": BLEU(tokenize=tokenizer)}, references, test_type="bs",
                      n_samples=BOOTSTRAP_SAMPLES)
    _, scores = test()
    reference_bleu, bleu = scores["BLEU"][0].score, scores["BLEU"][1].score
    # sacrebleu counts resampled differences strictly above the observed one: two systems whose
    # scores tie (identical outputs; BLEU 0 for both) get its floor 1 / (n + 1), not 1
    p_value = 1.0 if bleu == reference_bleu else scores["BLEU"][1].p_value
    return {"reference_bleu": reference_bleu, "bleu": bleu, "p_value": p_value}


def stats(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    """Mean and sample standard deviation (``None`` with one value) of the values given."""
    values = [v for v in values if v is not None]
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def collect(study: Study, out: Path, settings: Optional[Dict]) -> Dict:
    """The results of the study's runs from their records: per run and evaluated k (``runs``:
    a multi-path run once per k of its set) and per row, training k and evaluated k (``rows``),
    compared with the reference row's run of the same training k and seed at the same k."""
    tokenizer = "13a"
    if "--sacrebleu-tokenizer" in study.simuleval:
        tokenizer = study.simuleval[study.simuleval.index("--sacrebleu-tokenizer") + 1]
    runs: List[Dict] = []
    evaluated: Dict[Tuple, Tuple[Dict, Path]] = {}
    for run in grid(study, out, list(study.rows)):
        record = read_json(run.directory / "run.json")
        if record is None:
            continue
        trained = {key: record.get(key) for key in (
            "row", "seed", "finished", "updates", "max_update", "valid_loss",
            "best_valid_loss", "valid_curve", "skipped", "train_seconds")}
        trained.update(trained=run.waitk, directory=str(run.directory),
                       devices=list(dict.fromkeys(describe(session["device"])
                                                  for session in record["sessions"])),
                       commands=[session["command"] for session in record["sessions"]])
        for waitk in evaluation_lags(run.waitk):
            entry = {**trained, "waitk": waitk}
            checkpoint = run.directory / settings["checkpoint"] if settings else None
            if checkpoint is not None and checkpoint.is_file():
                output = evaluation_directory(run, settings["checkpoint"],
                                              settings["sentences"], waitk)
                evaluation = read_json(output / "eval.json")
                if evaluation and evaluation["fingerprint"] == fingerprint(checkpoint) and \
                        evaluation["simuleval"] == study.simuleval:
                    entry["eval"] = {"directory": str(output), **evaluation["scores"],
                                     "sentences": evaluation["sentences"],
                                     "seconds": evaluation["seconds"],
                                     "command": evaluation["command"]}
                    evaluated[(run.row, run.waitk, waitk, run.seed)] = (entry["eval"], output)
                elif evaluation:
                    log(f"table: {output} evaluated another checkpoint or with other SimulEval "
                        "options; left out")
            runs.append(entry)
    for entry in runs:
        key = (entry["row"], entry["trained"], entry["waitk"], entry["seed"])
        reference = evaluated.get((study.reference, *key[1:]))
        if key not in evaluated or reference is None:
            continue
        scores, output = evaluated[key]
        if entry["row"] == study.reference:
            scores.update(bleu_ratio=1.0, al_diff=0.0, p_value=None)
            continue
        test = paired_bootstrap(reference[1], output, tokenizer)
        scores.update(
            bleu_ratio=scores["BLEU"] / reference[0]["BLEU"] if reference[0]["BLEU"] > 0
            else None,
            al_diff=scores["AL"] - reference[0]["AL"], p_value=test["p_value"],
            bootstrap_bleu=test["bleu"], bootstrap_reference_bleu=test["reference_bleu"])
    rows = []
    for row in study.rows:
        for trained in study.waitks:
            for waitk in evaluation_lags(trained):
                finished = [e for e in runs if e["row"] == row and e["trained"] == trained
                            and e["waitk"] == waitk and e["finished"]]
                if finished:
                    rows.append(row_result(row, trained, waitk, finished))
    return {"runs": runs, "rows": rows, "tokenizer": tokenizer}


def row_result(row: str, trained: Union[int, str], waitk: int, finished: List[Dict]) -> Dict:
    """One line of the table: a row's finished runs of one training k, evaluated at ``waitk``,
    as mean and standard deviation over seeds."""
    scored = [e["eval"] for e in finished if "eval" in e]
    result = {"row": row, "trained": trained, "waitk": waitk,
              "seeds": [e["seed"] for e in finished],
              "seeds_evaluated": [e["seed"] for e in finished if "eval" in e],
              "updates": sorted({e["updates"] for e in finished}),
              "valid_loss": stats([e["valid_loss"] for e in finished]),
              "best_valid_loss": stats([e["best_valid_loss"] for e in finished])}
    for metric in METRICS:
        result[metric] = stats([s[metric] for s in scored])
    result["bleu_ratio"] = stats([s.get("bleu_ratio") for s in scored])
    result["al_diff"] = stats([s.get("al_diff") for s in scored])
    p_values = {str(e["seed"]): e["eval"]["p_value"] for e in finished
                if e.get("eval", {}).get("p_value") is not None}
    result["p_values"] = p_values
    result["p_value"] = max(p_values.values()) if p_values else None
    return result


def waitk_label(waitk: int, trained: Union[int, str]) -> str:
    """The k of a table line: ``3``, or ``3 (multi-path 1-9)`` for a multi-path model."""
    return str(waitk) if waitk == trained else f"{waitk} (multi-path {trained})"


def fmt(value: Optional[float], digits: int, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def mean_std(result: Dict, digits: int, seeds: Optional[int] = None) -> str:
    """``mean ± std`` (``-`` for the std of one value), and how many seeds gave it where that
    is fewer than ``seeds``."""
    if result["mean"] is None:
        return "-"
    text = f"{fmt(result['mean'], digits)} ± {fmt(result['std'], digits)}"
    return text + (f" ({result['n']} of {seeds} seeds)" if seeds and result["n"] < seeds else "")


def yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix(
        "\n...").strip()


def provenance() -> Dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name, package in (("torch", "torch"), ("fairseq", "fairseq-fixed"),
                          ("simuleval", "simuleval"), ("sacrebleu", "sacrebleu")):
        try:
            versions[name] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[name] = "?"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True)
    versions["commit"] = commit.stdout.strip() if commit.returncode == 0 else "?"
    return versions


def write_table(study: Study, out: Path, settings: Optional[Dict]) -> Dict:
    """``OUT/results.md`` and ``OUT/results.json`` from the runs' records, and
    ``OUT/bleu_vs_al.png`` when runs are evaluated (``settings``: the evaluation to report,
    default the last ``evaluate``'s, from ``OUT/evaluation.json``)."""
    settings = settings or read_json(out / "evaluation.json")
    collected = collect(study, out, settings)
    rows, runs = collected["rows"], collected["runs"]
    evaluated = any(row["seeds_evaluated"] for row in rows)
    commands_file = out / "commands.log"
    commands = commands_file.read_text(encoding="utf-8").splitlines() \
        if commands_file.is_file() else []
    devices = sorted({device for run in runs for device in run["devices"]})
    results = {
        "study": str(study.path), "base": study.base, "out": str(out),
        "shared_options": {key: value for key, value in study.config.options.items()
                           if study.config.sources[key] == str(study.path)},
        "rows_options": {row: dict(options) for row, options in study.rows.items()},
        "reference": study.reference, "seeds": study.seeds, "waitk": study.waitks,
        "evaluation": settings, "simuleval": study.simuleval,
        "bootstrap": {"test": "sacrebleu paired bootstrap (PairedTest, test_type bs)",
                      "samples": BOOTSTRAP_SAMPLES, "tokenizer": collected["tokenizer"],
                      "seed": os.environ.get("SACREBLEU_SEED", "12345"),
                      "p_value": "per seed against the reference row's run of the same seed "
                                 "and k; a row's p_value is the largest over its seeds"},
        "devices": devices, "commands": commands, "versions": provenance(),
        "rows": rows, "runs": runs}
    write_json(out / "results.json", results)

    lines = [f"# Study {study.name}", "",
             f"Study file `{display(study.path)}` (base `{study.base}`), reference row "
             f"`{study.reference}`, seeds {study.seeds}, k {study.waitks}. Shared options: "
             + (", ".join(f"`{k}: {yaml_value(v)}`" for k, v in
                          results["shared_options"].items()) or "none")
             + ".", ""]
    header = ["row", "k", "seeds", "updates", "valid loss", "best valid loss"]
    if evaluated:
        header += ["BLEU", "AL", "LAAL", f"BLEU / {study.reference}",
                   f"AL - {study.reference}", "p (max over seeds)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        seeds = str(len(row["seeds"]))
        if evaluated and len(row["seeds_evaluated"]) != len(row["seeds"]):
            seeds += f" ({len(row['seeds_evaluated'])} evaluated)"
        updates = row["updates"]
        cells = [row["row"], waitk_label(row["waitk"], row["trained"]), seeds,
                 f"{updates[0]}-{updates[-1]}" if len(updates) > 1 else str(updates[0]),
                 mean_std(row["valid_loss"], 3), mean_std(row["best_valid_loss"], 3)]
        if evaluated:
            cells += [mean_std(row["BLEU"], 2), mean_std(row["AL"], 2), mean_std(row["LAAL"], 2),
                      mean_std(row["bleu_ratio"], 3, len(row["seeds_evaluated"])),
                      fmt(row["al_diff"]["mean"], 2, sign=True), fmt(row["p_value"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample standard deviation over seeds (`-`: one seed). Validation loss: "
              "fairseq's label-smoothed cross-entropy (base 2) on the valid set, the last one "
              "logged and the lowest."]
    if evaluated:
        lines += [
            f"SimulEval with the text agent on {settings['sentences'] or 'all'} test "
            f"sentence(s), `{settings['checkpoint']}`; AL and LAAL in words (plain: SimulEval "
            "1.1.4 has no computation-aware latency for text input). "
            f"`BLEU / {study.reference}`: mean over seeds of each seed's BLEU divided by the "
            f"reference row's at the same k and seed; `AL - {study.reference}`: mean of the "
            "per-seed differences; p: sacrebleu's paired bootstrap (1,000 resamples) against "
            "the reference row's run of the same seed, the largest p over the seeds (every "
            "seed's p is in results.json).", "", "![BLEU vs AL](bleu_vs_al.png)"]
    lines += ["", "## Runs", "",
              "| row | k | seed | updates | valid loss | best | train time | device |"
              + (" BLEU | AL | LAAL | p |" if evaluated else ""),
              "|" + "---|" * (12 if evaluated else 8)]
    for run in runs:
        cells = [run["row"], waitk_label(run["waitk"], run["trained"]), str(run["seed"]),
                 f"{run['updates']}" + ("" if run["finished"] else " (partial)"),
                 fmt(run["valid_loss"], 3), fmt(run["best_valid_loss"], 3),
                 duration(run["train_seconds"] or 0), "; ".join(run["devices"])]
        if evaluated:
            scores = run.get("eval", {})
            cells += [fmt(scores.get("BLEU"), 2), fmt(scores.get("AL"), 2),
                      fmt(scores.get("LAAL"), 2), fmt(scores.get("p_value"), 3)]
        lines.append("| " + " | ".join(cells) + " |")
    versions = results["versions"]
    lines += ["", "## How it was produced", "",
              f"Commit {versions['commit']}; python {versions['python']}, torch "
              f"{versions['torch']}, fairseq {versions['fairseq']}, simuleval "
              f"{versions['simuleval']}, sacrebleu {versions['sacrebleu']}. Training devices: "
              + ("; ".join(devices) or "none") + ". Each run's fairseq-train command is in its "
              "`config.yaml` (and `run.json`), each evaluation's SimulEval command in "
              "`eval_*/eval.json`.", "", "```bash", *commands, "```", ""]
    write_text(out / "results.md", "\n".join(lines))
    plot = out / "bleu_vs_al.png"
    if evaluated:
        write_plot(rows, plot)
    else:
        plot.unlink(missing_ok=True)
    log(f"table: {out / 'results.md'}" + (f", {plot}" if evaluated else ""))
    return results


def display(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def curve_name(row: Dict) -> str:
    """The BLEU-AL curve a table line belongs to: its row, or its row's multi-path model."""
    return row["row"] if row["waitk"] == row["trained"] else \
        f"{row['row']} multi-path {row['trained']}"


def draw_curves(axis: Any, rows: List[Dict]) -> Dict[str, str]:
    """BLEU against AL on ``axis``: a line over k per row's per-k models, and one per multi-path
    model, at the means with the standard deviations as error bars; returns each curve's colour."""
    colours = {}
    for name in dict.fromkeys(curve_name(row) for row in rows):
        points = sorted((row["AL"]["mean"], row["BLEU"]["mean"], row["AL"]["std"] or 0,
                         row["BLEU"]["std"] or 0, row["waitk"]) for row in rows
                        if curve_name(row) == name and row["BLEU"]["mean"] is not None)
        if not points:
            continue
        drawn = axis.errorbar([p[0] for p in points], [p[1] for p in points],
                              xerr=[p[2] for p in points], yerr=[p[3] for p in points],
                              fmt="s--" if "multi-path" in name else "o-", capsize=3,
                              label=name)
        colours[name] = drawn.lines[0].get_color()
        for latency, bleu, _, _, waitk in points:
            axis.annotate(f"k={waitk}", (latency, bleu), fontsize=7)
    axis.set(xlabel="AL (words)", ylabel="BLEU")
    axis.legend(fontsize=7)
    return colours


def write_plot(rows: List[Dict], path: Path) -> None:
    """The study's BLEU-AL curves (``draw_curves``) as a PNG."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # before its import logs
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.5))
    draw_curves(axis, rows)
    axis.set_title("BLEU vs AL (mean ± std over seeds)")
    figure.tight_layout()
    with atomic_output(path) as partial:
        figure.savefig(partial, dpi=110)
    plt.close(figure)


def table_command(args) -> None:
    study = load(args)
    out = output_directory(study, args)
    settings = read_json(out / "evaluation.json")
    if args.sentences is not None or args.checkpoint_name is not None:
        settings = {"checkpoint": args.checkpoint_name or (settings or {}).get(
            "checkpoint", "checkpoint_last.pt"), "sentences": args.sentences if
            args.sentences is not None else (settings or {}).get("sentences", 0)}
    write_table(study, out, settings)
    print((out / "results.md").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------- commands
def load(args) -> Study:
    try:
        return load_study(args.study)
    except ConfigError as error:
        raise RECIPE.fail(f"{args.command}: {error}") from None


def record_command(out: Path, args) -> None:
    """Append the command line to ``OUT/commands.log`` (listed in results.md)."""
    out.mkdir(parents=True, exist_ok=True)
    line = f"# {time.strftime('%Y-%m-%d %H:%M:%S')}\npython scripts/study.py " + \
        shlex.join(args.argv) + "\n"
    with open(out / "commands.log", "a", encoding="utf-8") as commands:
        commands.write(line)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("study", help="a study file: a name under configs/ (e.g. "
                                     "studies/t2t_screen_en_de) or a .yaml path")
        p.add_argument("--data", help="the t2t_recipe.py prepare --out directory (default: the "
                                      "study's data:)")
        p.add_argument("--out", help="the study's output directory (default: the study's out:, "
                                     "else work/studies/<study name>)")

    p = commands.add_parser("run", help="train every row x k x seed (finished runs skipped)")
    common(p)
    p.add_argument("--rows", help="only these rows (comma-separated)")
    p.add_argument("--seeds", help="only these of the study's seeds (comma-separated)")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once (default 1)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even with CUDA")
    p.add_argument("--resume", action="store_true",
                   help="continue partial runs from their checkpoint_last.pt (else refused)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a fairseq-train option for every run, over the rows' (YAML value); "
                        "repeatable")
    p.add_argument("--dry-run", action="store_true", help="check and list the runs only")
    p.set_defaults(run=run_command)

    p = commands.add_parser("adopt", help="take a finished run trained elsewhere as one of the "
                                          "study's runs (its options checked)")
    common(p)
    p.add_argument("--row", required=True, help="the row of the run")
    p.add_argument("--seed", required=True, help="the seed of the run")
    p.add_argument("--waitk", help="the k of the run (needed when the study trains several)")
    p.add_argument("--from", dest="source", required=True, metavar="DIR",
                   help="the run's save directory (checkpoint_last.pt; its files are copied in)")
    p.set_defaults(run=adopt_command)

    p = commands.add_parser("evaluate", help="SimulEval of chosen rows and the reference row")
    common(p)
    p.add_argument("--rows", help="these rows (comma-separated; default all), and the reference")
    p.add_argument("--seeds", help="only these of the study's seeds (comma-separated)")
    p.add_argument("--sentences", type=int, default=0, help="first N test sentences (0: all)")
    p.add_argument("--checkpoint-name", default="checkpoint_last.pt",
                   help="checkpoint file in each run directory (default checkpoint_last.pt)")
    p.add_argument("--jobs", type=int, default=1, help="SimulEval runs at once (default 1)")
    p.set_defaults(run=evaluate_command)

    p = commands.add_parser("table", help="write the table again from the records")
    common(p)
    p.add_argument("--sentences", type=int, default=None,
                   help="report this evaluation (default: the last evaluate's)")
    p.add_argument("--checkpoint-name", default=None,
                   help="report this evaluation (default: the last evaluate's)")
    p.set_defaults(run=table_command)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    args.run(args)
