"""What the recipes and data scripts share: timestamped logs, commands that stop the recipe with
a message naming the step, atomic output files, UTF-8 text read with errors naming file:line,
SimulEval runs (in parallel) and their scoring, fairseq's count of skipped training samples, and
the results table with its BLEU-vs-latency plot."""
import json
import logging
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

PLUGIN = Path(__file__).resolve().parents[1]  # the package fairseq loads with --user-dir
ROOT = PLUGIN.parent  # the repository: configs/, data/, simuleval_agents/, scripts/
Item = TypeVar("Item")
# The tools run as modules of this interpreter, so the recipes work wherever the packages import
# (a venv, PYTHONPATH), with or without their console scripts on PATH.
FAIRSEQ_GENERATE = [sys.executable, "-m", "fairseq_cli.generate"]
FAIRSEQ_PREPROCESS = [sys.executable, "-m", "fairseq_cli.preprocess"]
FAIRSEQ_TRAIN = [sys.executable, "-m", "fairseq_cli.train"]
SHARDS_HELP = ("SimulEval processes per run, each on a contiguous share of the instances, "
               "their logs joined and scored together (default 1)")
SIMULEVAL = [sys.executable, "-m", "simuleval.cli"]
# fairseq.data.data_utils' warning when it drops samples longer than the model's max positions
SKIPPED = re.compile(r"(\d+) samples have invalid sizes and will be skipped, max_positions=(.*?), "
                     r"first few sample ids")
VALIDATION = re.compile(r'validation on "([^"]+)" subset')


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so tools that pick a format by it work),
    moved onto ``path`` with ``os.replace`` once the block succeeds and removed if it fails: a
    failing step leaves no half-written file that a later step would trust."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_output(path) as partial:
        partial.write_text(text, encoding="utf-8")


def read_lines(path: Path, tag: str) -> List[str]:
    """The lines of a UTF-8 text file (split at ``\\n`` only, as fairseq reads them); bytes
    that are not UTF-8 stop the script with a message naming ``path:line``."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise SystemExit(f"[{tag}] {path}:{line}: not UTF-8 ({error.reason}, byte "
                         f"{data[error.start]:#04x})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def train_sentencepiece(prefix: Path, **options) -> None:
    """``SentencePieceTrainer.train`` into ``prefix.model`` and ``prefix.vocab``, each written
    atomically."""
    import sentencepiece

    with atomic_output(Path(f"{prefix}.model")) as model, \
            atomic_output(Path(f"{prefix}.vocab")) as vocab:
        partial = model.with_suffix("")
        try:
            sentencepiece.SentencePieceTrainer.train(model_prefix=str(partial), **options)
            os.replace(f"{partial}.vocab", vocab)
        finally:
            Path(f"{partial}.vocab").unlink(missing_ok=True)


def read_tsv_pairs(pattern: str, split: str, src: str, tgt: str, tag: str,
                   step: str) -> List[Tuple[str, str]]:
    """(source, target) pairs of a gettext-mt TSV (``pattern`` with ``{split}``), columns
    chosen by its header line; a missing file, a header without the columns, a wrong field
    count, an empty field or non-UTF-8 text stops the step naming the file (and line)."""
    try:
        path = Path(pattern.format(split=split))
    except (AttributeError, IndexError, KeyError, ValueError):
        raise SystemExit(f"[{tag}] {step}: --corpus {pattern!r} is not a path pattern with "
                         "{split} (and no other braces)") from None
    if not path.is_file():
        raise SystemExit(f"[{tag}] {step}: missing {path} (--corpus with {{split}})")
    lines = read_lines(path, tag)
    header = lines[0].split("\t") if lines else []
    if src not in header or tgt not in header:
        raise SystemExit(f"[{tag}] {step}: {path} header is {header}, expected columns "
                         f"'{src}' (--src) and '{tgt}' (--tgt)")
    src_column, tgt_column = header.index(src), header.index(tgt)
    pairs = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise SystemExit(f"[{tag}] {step}: {path}:{number} has {len(fields)} fields, "
                             f"not {len(header)}")
        pairs.append((fields[src_column].strip(), fields[tgt_column].strip()))
    refuse_empty([source for source, _ in pairs], path, f"source field ({src})", tag, 2)
    refuse_empty([target for _, target in pairs], path, f"target field ({tgt})", tag, 2)
    return pairs


def read_recipe(data: Path, tag: str, step: str) -> Dict:
    """``data/recipe.json``, the settings ``prepare`` writes last; missing, it stops the step
    with a message naming the file (not a traceback)."""
    path = Path(data) / "recipe.json"
    if not path.is_file():
        raise SystemExit(f"[{tag}] {step}: missing {path}; run prepare first")
    return json.loads(path.read_text())


def refuse_empty(lines: Sequence[str], path: Path, what: str, tag: str,
                 first_line: int = 1) -> None:
    """Stop at the first blank entry of ``lines`` (line ``first_line`` onwards of ``path``)
    with a message naming ``path:line`` and ``what`` it should hold."""
    for number, line in enumerate(lines, start=first_line):
        if not line.strip():
            raise SystemExit(f"[{tag}] {path}:{number}: empty {what}")


def skipped_samples(log_file: Path) -> Dict[str, Tuple[int, str]]:
    """From a fairseq-train log: per subset (``train``, ``valid``), how many samples fairseq
    skipped as longer than the model's max positions, and the max_positions it names."""
    skipped: Dict[str, Tuple[int, str]] = {}
    subset = "train"
    for line in Path(log_file).read_text(encoding="utf-8", errors="replace").splitlines():
        validation = VALIDATION.search(line)
        subset = validation[1] if validation else "train" if "begin training epoch" in line \
            else subset
        match = SKIPPED.search(line)
        if match and subset not in skipped:
            skipped[subset] = (int(match[1]), match[2])
    return skipped


class Recipe:
    """Logging and command running for one recipe, tagged ``[tag HH:MM:SS]``."""

    def __init__(self, tag: str):
        self.tag = tag

    def log(self, message: str) -> None:
        print(f"[{self.tag} {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def fail(self, message: str) -> SystemExit:
        return SystemExit(f"[{self.tag}] {message}")

    def run(self, command: Sequence, what: str, log_file: Optional[Path] = None,
            echo: bool = False) -> None:
        """Run a command from the repository root, its output on the terminal, or in
        ``log_file`` (and on the terminal too with ``echo``); stop with a message naming the
        step if it fails."""
        command = [str(c) for c in command]
        self.log(f"{what}: {' '.join(command)}" + (f" > {log_file}" if log_file else ""))
        if log_file is None:
            returncode = subprocess.run(command, cwd=ROOT).returncode
        else:
            with open(log_file, "wb") as output:
                process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT)
                for chunk in iter(lambda: process.stdout.read1(1 << 16), b""):
                    output.write(chunk)
                    if echo:
                        sys.stdout.buffer.write(chunk)
                        sys.stdout.flush()
                returncode = process.wait()
        if returncode != 0:
            where = f"; its output is in {log_file}" if log_file else ""
            raise self.fail(f"{what} failed (exit code {returncode}){where}")

    def train(self, command: Sequence, what: str, log_file: Path) -> Dict[str, int]:
        """``fairseq-train`` (its output on the terminal and in ``log_file``); logs how many
        samples of each subset fairseq skipped as longer than the model's max positions
        (``--skip-invalid-size-inputs-valid-test`` skips them in validation too) and returns
        those counts."""
        self.run(command, what, log_file, echo=True)
        skipped = skipped_samples(log_file)
        for subset, (count, max_positions) in skipped.items():
            self.log(f"{what}: skipped {count} {subset} sample(s) longer than "
                     f"max_positions={max_positions} (--max-source-positions, "
                     f"--max-target-positions); see {log_file}")
        return {subset: count for subset, (count, _) in skipped.items()}

    def simuleval(self, command: Sequence, scoring: Sequence[str], output: Path, what: str,
                  quiet: bool, shards: int = 1) -> Dict[str, float]:
        """The ``simuleval`` CLI ``command`` with ``--no-scoring``, then SimulEval's own scoring
        of the run with the ``scoring`` flags into ``output/scores.tsv``; a run whose agent wrote
        nothing stops with one line naming it (SimulEval itself dies with a traceback). With
        ``shards`` > 1 the instances are split over that many SimulEval processes at once
        (:meth:`simuleval_shards`) and scored together."""
        from leapformer_fairseq.simuleval_scores import simuleval_score_only

        if shards != 1:
            self.simuleval_shards(command, scoring, output, what, shards)
        else:
            self.run([*command, *scoring, "--no-scoring"], what,
                     log_file=output / "simuleval.log" if quiet else None)
        try:
            return simuleval_score_only(output, scoring)
        except ValueError as error:
            raise self.fail(f"{what}: {error}") from None

    def simuleval_shards(self, command: Sequence, scoring: Sequence[str], output: Path,
                         what: str, shards: int) -> None:
        """``command`` (a SimulEval CLI run with ``--source`` and ``--output output``) as
        ``shards`` processes at once, shard i on the i-th contiguous range of instances
        (``--start-index``/``--end-index``) into ``output/shards/<i>/`` (its output in
        ``simuleval.log`` there); their ``instances.log`` files joined in order into
        ``output/instances.log``, each instance keeping its index."""
        command = [str(part) for part in command]
        count = len(read_lines(Path(command[command.index("--source") + 1]), self.tag))
        if not 1 <= shards <= count:
            raise self.fail(f"{what}: --shards {shards}: between 1 and the {count} instances")
        bounds = [round(i * count / shards) for i in range(shards + 1)]
        folders = [output / "shards" / str(i) for i in range(shards)]
        at = command.index("--output") + 1

        def shard(i: int) -> Dict:
            folders[i].mkdir(parents=True, exist_ok=True)
            self.run([*command[:at], folders[i], *command[at + 1:], "--start-index", bounds[i],
                      "--end-index", bounds[i + 1], *scoring, "--no-scoring"],
                     f"{what} shard {i + 1}/{shards} (instances {bounds[i]}-{bounds[i + 1] - 1})",
                     log_file=folders[i] / "simuleval.log")
            return {}

        self.parallel(shard, range(shards), shards)
        lines = []
        for i, folder in enumerate(folders):
            logged = read_lines(folder / "instances.log", self.tag)
            if len(logged) != bounds[i + 1] - bounds[i]:
                raise self.fail(f"{what}: shard {i + 1} logged {len(logged)} instances, not "
                                f"{bounds[i + 1] - bounds[i]}; see {folder / 'simuleval.log'}")
            lines += logged
        write_text(output / "instances.log", "".join(line + "\n" for line in lines))
        self.log(f"{what}: {shards} shards joined, {count} instances -> {output / 'instances.log'}")

    def first_lines(self, paths: Sequence[Path], output: Path, count: int) -> List[Path]:
        """``paths`` themselves, or (``count`` > 0) copies of their first ``count`` lines in
        ``output``, under their names."""
        if not count:
            return list(paths)
        copies = []
        for path in paths:
            lines = read_lines(path, self.tag)[:count]
            copies.append(output / path.name)
            write_text(copies[-1], "".join(line + "\n" for line in lines))
        return copies

    def evaluation_runs(self, attn_types: str, waitks: str,
                        checkpoint: Callable[[str, Union[int, str]], Path], train: str,
                        multipath: Optional[str] = None) -> List[Tuple[str, int, Path]]:
        """(run name, k, checkpoint) of every ``--attn-types`` x ``--waitk``
        (comma-separated k values). With ``--multipath SET`` every k is one of the set, and the
        checkpoint is the multi-path run's (named ``<attention>_k<SET>``). A missing checkpoint
        stops the recipe naming the ``train`` step that makes it."""
        from leapformer_fairseq.models.leapformer_transformer import waitk_lags

        lags = None
        if multipath is not None:
            try:
                lags = waitk_lags(multipath)
            except ValueError as error:
                raise self.fail(f"evaluate: --multipath: {error}") from None
        values = [k.strip() for k in waitks.split(",")]
        if not all(k.isdigit() and int(k) >= 1 for k in values):
            raise self.fail(f"evaluate: --waitk {waitks}: single k values >= 1, comma-separated; "
                            "a multi-path model is evaluated with --multipath SET (e.g. "
                            "--multipath 1-9 --waitk 1,3,5)")
        runs = []
        for attn_type in attn_types.split(","):
            for waitk in map(int, values):
                if lags is not None and waitk not in lags:
                    raise self.fail(f"evaluate: --waitk {waitk} is not in --multipath "
                                    f"{multipath}, the k values the model was trained for")
                trained = waitk if multipath is None else multipath
                path = checkpoint(attn_type, trained)
                if not path.is_file():
                    raise self.fail(f"evaluate: missing {path}; run {train} --attn-type "
                                    f"{attn_type} --waitk {trained} first")
                runs.append((attn_type if multipath is None else f"{attn_type}_k{multipath}",
                             waitk, path))
        return runs

    def parallel(self, function: Callable[[Item], Dict], items: Sequence[Item],
                 jobs: int) -> List[Dict]:
        """``function`` on every item, ``jobs`` at a time, results in order."""
        if jobs < 1:
            raise self.fail(f"--jobs must be >= 1, got {jobs}")
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(function, items))

    def write_results(self, rows: List[Dict], columns: Sequence[str], out: Path,
                      curves: Sequence[Tuple[str, str]], xlabel: str) -> None:
        """``out/results.{md,json}`` (``attn_type``, ``waitk`` and ``columns`` per row) and
        ``out/bleu_vs_al.png``: BLEU against each latency metric of ``curves``
        (``(metric, matplotlib style)``), one line per attention type, points labelled k."""
        header = ["attn_type", "waitk", *columns]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            lines.append("| " + " | ".join(
                f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "-"))
                for c in header) + " |")
        table = "\n".join(lines) + "\n"
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "results.md", table)
        write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
        print(table)

        # SimulEval logs at DEBUG; matplotlib's import logs too, so quiet it first
        logging.getLogger("matplotlib").setLevel(logging.WARNING)
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(5.5, 4))
        for attn_type in sorted({row["attn_type"] for row in rows}):
            for metric, style in curves:
                points = sorted((row[metric], row["BLEU"], row["waitk"]) for row in rows
                                if row["attn_type"] == attn_type)
                label = attn_type if len(curves) == 1 else f"{attn_type} {metric}"
                axis.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
                for latency, bleu, waitk in points:
                    axis.annotate(f"k={waitk}", (latency, bleu), fontsize=8)
        metrics = " and ".join(metric for metric, _ in curves)
        axis.set(xlabel=xlabel, ylabel="BLEU", title=f"BLEU vs {metrics}")
        axis.legend(fontsize=8)
        figure.tight_layout()
        with atomic_output(out / "bleu_vs_al.png") as partial:
            figure.savefig(partial, dpi=110)
        self.log(f"evaluate: {out / 'results.md'}, {out / 'bleu_vs_al.png'}")
