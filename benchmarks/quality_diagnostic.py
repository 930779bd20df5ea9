"""The attention diagnostic (docs/diagnostics.md) of trained runs, along their training.

    python benchmarks/quality_diagnostic.py --data work/gettext-en-de/data-bin \
        --run leap=work/gettext-en-de/runs/leap_k3 \
        --run softmax=work/gettext-en-de/runs/softmax_k3 \
        --out benchmarks/results/t2t_quality_en_de/diagnostic_default

For every run it diagnoses each saved ``checkpoint_<epoch>_<update>.pt`` (and
``checkpoint_last.pt``) on the first ``--max-sentences`` sentences of ``--subset``, and writes:
``OUT.json`` (every statistic of every block, per run and update, with the validation losses of
the run's ``train.log``, how each run was trained (the header of its ``config.yaml``, which the
recipes write), the command and the machine), ``OUT.md`` (the last checkpoint of each
run block by block, and the trajectory of the LeaP statistics averaged over blocks) and
``OUT.png`` (entropy per block at the end; factor spread and entropy along training).
"""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from statistics import mean
from typing import Dict, List, Optional, Tuple

import matplotlib
import torch
from attention import machine_description  # benchmarks/attention.py

from leapformer_fairseq.diagnostics import STATISTICS, checkpoint_batches, diagnose

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = re.compile(r"checkpoint_\d+_(\d+)\.pt$")
VALID = re.compile(r"valid on 'valid' subset \| loss ([\d.]+) .*\| num_updates (\d+)")


def checkpoints(run: Path) -> List[Tuple[int, Path]]:
    """``(update, path)`` of the run's interval checkpoints, in order of updates; the last
    checkpoint too when no interval checkpoint has its update."""
    found = sorted((int(match.group(1)), path) for path in run.glob("checkpoint_*_*.pt")
                   if (match := CHECKPOINT.search(path.name)))
    last = run / "checkpoint_last.pt"
    if last.is_file():
        update = int(torch.load(last, map_location="cpu", weights_only=False)
                     ["optimizer_history"][-1]["num_updates"])
        if update not in {u for u, _ in found}:
            found.append((update, last))
    if not found:
        raise SystemExit(f"--run {run}: no checkpoint_<epoch>_<update>.pt or checkpoint_last.pt")
    return found


def training_record(run: Path) -> List[str]:
    """The comment lines heading the run's ``config.yaml``: its configuration and command (paths
    inside the repository made relative to it)."""
    record = run / "config.yaml"
    lines = record.read_text(encoding="utf-8").splitlines() if record.is_file() else []
    return [line[2:].replace(f"{ROOT}/", "") for line in lines if line.startswith("# ")]


def validation_losses(run: Path) -> Dict[int, float]:
    log = run / "train.log"
    text = log.read_text(encoding="utf-8") if log.is_file() else ""
    return {int(update): float(loss) for loss, update in VALID.findall(text)}


def diagnose_checkpoint(path: Path, data: str, subset: str, sentences: int) -> Dict:
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides={"data": data})
    return diagnose(models[0], checkpoint_batches(task, subset, sentences, 4000))


def block_mean(blocks: Dict[str, Dict], statistic: str) -> Optional[float]:
    values = [row[statistic] for row in blocks.values() if row[statistic] is not None]
    return mean(values) if values else None


def cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(report: Dict) -> str:
    runs = report["runs"]
    lines = [f"# Attention diagnostic: {', '.join(runs)}", "",
             f"`{report['command']}`", "",
             f"Machine: {report['machine']['cpu']} ({report['machine']['cpu_count']} cores), "
             f"torch {report['machine']['torch']}, commit {report['commit']}. "
             f"{report['sentences']} sentences of "
             f"`{report['subset']}`, teacher-forced. Columns: docs/diagnostics.md.", ""]
    for name, run in runs.items():
        lines += [f"- **{name}** was trained by:"] + [f"  `{line}`" for line in run["trained"]]
    lines.append("")
    for name, run in runs.items():
        last = run["updates"][-1]
        lines += [f"## {name} at update {last['update']} (validation loss "
                  f"{cell(last['valid_loss'])})", "",
                  "| block | type | " + " | ".join(STATISTICS) + " |",
                  "|---|---|" + "---|" * len(STATISTICS)]
        for block, row in last["blocks"].items():
            lines.append(f"| {block} | {row['attn_type']} | "
                         + " | ".join(cell(row[s]) for s in STATISTICS) + " |")
        lines.append("")
    lines += ["## Along training (mean over blocks)", "",
              "| run | update | valid loss | factor_spread | factor_mean | entropy | clamp_rate |",
              "|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        for point in run["updates"]:
            blocks = point["blocks"]
            lines.append(f"| {name} | {point['update']} | {cell(point['valid_loss'])} | "
                         + " | ".join(cell(block_mean(blocks, s)) for s in
                                      ("factor_spread", "factor_mean", "entropy", "clamp_rate"))
                         + " |")
    return "\n".join(lines) + "\n"


def plot(report: Dict, path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run in report["runs"].items():
        blocks = run["updates"][-1]["blocks"]
        left.plot(range(len(blocks)), [row["entropy"] for row in blocks.values()], "o-",
                  label=name)
        left.set_xticks(range(len(blocks)), [b.replace(".layers.", "").replace("_attn", "")
                                             for b in blocks], rotation=60, fontsize=7)
        updates = [point["update"] for point in run["updates"]]
        right.plot(updates, [block_mean(p["blocks"], "entropy") for p in run["updates"]], "o-",
                   label=f"{name} entropy")
        spread = [block_mean(p["blocks"], "factor_spread") for p in run["updates"]]
        if any(value is not None for value in spread):
            right.plot(updates, spread, "s--", label=f"{name} factor spread")
    left.set_ylabel("normalised attention entropy (1 = uniform)")
    left.set_title("per block, last checkpoint")
    right.set_xlabel("update")
    right.set_title("mean over blocks, along training")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                        help="a training run directory to diagnose (repeatable)")
    parser.add_argument("--data", required=True, help="the data-bin the runs trained on")
    parser.add_argument("--subset", default="valid")
    parser.add_argument("--max-sentences", type=int, default=200)
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args()
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True).stdout.strip()
    report = {"command": "python " + " ".join(sys.argv), "commit": commit,
              "machine": machine_description("cpu"),
              "subset": args.subset, "sentences": args.max_sentences, "runs": {}}
    for spec in args.run:
        name, _, directory = spec.partition("=")
        if not directory:
            raise SystemExit(f"--run {spec}: expected NAME=DIR")
        run = Path(directory)
        losses = validation_losses(run)
        points = []
        for update, path in checkpoints(run):
            print(f"[diagnostic] {name} update {update}: {path}", flush=True)
            points.append({"update": update, "checkpoint": str(path),
                           "valid_loss": losses.get(update),
                           "blocks": diagnose_checkpoint(path, args.data, args.subset,
                                                         args.max_sentences)})
        report["runs"][name] = {"directory": str(run), "trained": training_record(run),
                                "updates": points}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    args.out.with_suffix(".md").write_text(table)
    plot(report, args.out.with_suffix(".png"))
    print(table, end="")


if __name__ == "__main__":
    main()
