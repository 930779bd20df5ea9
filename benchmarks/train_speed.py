"""Training throughput of a text-to-text wait-k model per attention type, each run alone:
updates/s and target tokens/s over a window of updates.

    python benchmarks/train_speed.py --data work/t2t --set bf16=true      # a GPU (device_speed.sh)
    python benchmarks/train_speed.py --data work/demo --config t2t/demo --window 20,60 \\
        --log-interval 20 --cpu

Each attention type trains a fresh model with ``scripts/t2t_recipe.py train`` (``--config``,
``--attn-type`` for every block, ``--set`` overrides) in its own folder under ``--work`` (its
``data-bin`` a link to ``--data``'s), one run after the other, for the window's last update,
without validation or checkpoints (what they cost is not training speed), logging every
``--log-interval`` updates; both window ends must be multiples of it. From fairseq's
``train_inner`` lines after the window's first update: each logged interval's time is its
updates over its ``ups`` (fairseq times the whole interval, data loading included), its tokens
``wpb`` (target tokens per update) times its updates; updates/s and tokens/s are their sums'
ratios. Writes ``train_speed_<device>.{json,md,png}`` under ``--out`` with the command, the
machine and each run's precision, batch size and log.
"""
import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from attention import invocation, machine_description  # noqa: E402

BASELINE = "softmax"
FIELD = re.compile(r"(\w+)=([-+\d.eE]+)")


def train_inner(log: Path) -> List[Dict[str, float]]:
    """The numbers of each ``train_inner`` line of a fairseq-train log, in order."""
    return [{key: float(value) for key, value in FIELD.findall(line)}
            for line in log.read_text().splitlines() if "| train_inner |" in line]


def window_throughput(rows: List[Dict[str, float]], first: int, last: int) -> Dict[str, float]:
    """Updates/s and tokens/s over updates ``first + 1 .. last`` from ``train_inner`` rows whose
    intervals tile that window exactly (one row at ``first``, one at ``last``)."""
    updates = [int(row["num_updates"]) for row in rows]
    for end in (first, last):
        if end not in updates:
            raise ValueError(f"no train_inner line at update {end} (logged: {updates}); the "
                             "window's ends must be multiples of --log-interval")
    seconds = tokens = 0.0
    previous = first
    for row, update in zip(rows, updates):
        if first < update <= last:
            count = update - previous
            seconds += count / row["ups"]
            tokens += count * row["wpb"]
            previous = update
    return {"updates": last - first, "seconds": seconds, "target_tokens": tokens,
            "updates_per_s": (last - first) / seconds, "tokens_per_s": tokens / seconds,
            "wall_s": rows[updates.index(last)]["wall"] - rows[updates.index(first)]["wall"]}


def precision(options: Dict) -> str:
    """The training precision of resolved fairseq-train ``options``."""
    for flag in ("bf16", "fp16", "memory-efficient-bf16", "memory-efficient-fp16"):
        if options.get(flag):
            return flag
    return "fp32"


def run_one(attn_type: str, args) -> Dict:
    """Train ``attn_type`` from scratch for the window and measure it."""
    first, last = args.window
    data = Path(args.work) / attn_type
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    (data / "data-bin").symlink_to(Path(args.data, "data-bin").resolve())
    shutil.copy(Path(args.data, "recipe.json"), data / "recipe.json")
    command = [sys.executable, str(ROOT / "scripts" / "t2t_recipe.py"), "train",
               "--data", str(data), "--config", args.config, "--attn-type", attn_type,
               "--max-update", str(last), "--set", f"log-interval={args.log_interval}",
               "--set", "disable-validation=true", "--set", "no-save=true",
               *[item for text in args.set for item in ("--set", text)],
               *(["--cpu"] if args.cpu else [])]
    print(f"[train_speed] {attn_type}: {' '.join(command)}", flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise SystemExit(f"[train_speed] training {attn_type} failed; its log is under {data}")
    (run,) = (data / "runs").iterdir()
    options = yaml.safe_load((run / "config.yaml").read_text())["fairseq-train"]
    result = window_throughput(train_inner(run / "train.log"), first, last)
    return {"attn_type": attn_type, "precision": precision(options), "arch": options["arch"],
            "max_tokens": options.get("max-tokens"), "log": str(run / "train.log"), **result}


def markdown(report: Dict) -> str:
    first, last = report["window"]
    lines = ["# Training throughput", "", f"Command: `{report['command']}` (commit "
             f"{report['commit']})", "",
             "Machine: " + ", ".join(f"{k}={v}" for k, v in report["machine"].items()), "",
             f"Configuration `{report['config']}` on `{report['data']}`, each attention type "
             f"trained alone from scratch, without validation or checkpoints; updates "
             f"{first + 1}-{last} (fairseq's per-interval `ups` and `wpb`, logged every "
             f"{report['log_interval']} updates).", "",
             "| attention | arch | precision | max tokens | updates/s | target tokens/s | "
             f"vs {BASELINE} |", "|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        versus = run.get(f"speed_vs_{BASELINE}")
        lines.append(f"| {run['attn_type']} | {run['arch']} | {run['precision']} | "
                     f"{run['max_tokens']} | {run['updates_per_s']:.2f} | "
                     f"{run['tokens_per_s']:.0f} | "
                     f"{'-' if versus is None else f'{versus:.2f}x'} |")
    return "\n".join(lines) + "\n"


def plot(report: Dict, path: Path) -> None:
    import matplotlib
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(5, 4))
    runs = report["runs"]
    axis.bar([run["attn_type"] for run in runs], [run["updates_per_s"] for run in runs])
    first, last = report["window"]
    axis.set(ylabel=f"updates/s (updates {first + 1}-{last})",
             title=f"{report['config']} on {report['machine'].get('gpu', report['device'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a t2t_recipe.py prepare --out folder")
    parser.add_argument("--config", default="t2t/small", help="the training configuration")
    parser.add_argument("--attn-types", default=f"{BASELINE},leap",
                        help="attention types of every block, trained one after the other")
    parser.add_argument("--window", default="200,700",
                        help="FIRST,LAST: measure updates FIRST+1 .. LAST (default 200,700)")
    parser.add_argument("--log-interval", type=int, default=100,
                        help="fairseq's log interval; divides both window ends (default 100)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a fairseq-train option for every run (t2t_recipe.py's --set), "
                             "e.g. bf16=true, max-tokens=4096")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU")
    parser.add_argument("--work", default=str(ROOT / "work" / "train_speed"),
                        help="the runs' folders (replaced)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    try:
        args.window = [int(n) for n in args.window.split(",")]
    except ValueError:
        parser.error(f"--window: FIRST,LAST updates, got {args.window!r}")
    if len(args.window) != 2 or not 0 <= args.window[0] < args.window[1]:
        parser.error(f"--window: FIRST,LAST with 0 <= FIRST < LAST, got {args.window}")
    if args.log_interval < 1 or any(n % args.log_interval for n in args.window):
        parser.error(f"--log-interval {args.log_interval} must divide both --window ends "
                     f"{args.window}")
    if not Path(args.data, "data-bin").is_dir():
        parser.error(f"--data: {Path(args.data, 'data-bin')} not found; run "
                     "scripts/t2t_recipe.py prepare first")
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    runs = [run_one(attn_type, args) for attn_type in args.attn_types.split(",")]
    baseline = next((run for run in runs if run["attn_type"] == BASELINE), None)
    for run in runs:
        if baseline is not None:
            run[f"speed_vs_{BASELINE}"] = run["updates_per_s"] / baseline["updates_per_s"]
    report = {**invocation(), "device": device, "machine": machine_description(device),
              "config": args.config, "data": args.data, "window": args.window,
              "log_interval": args.log_interval, "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train_speed_{device}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    path.with_suffix(".md").write_text(table)
    plot(report, path.with_suffix(".png"))
    print(table)
    print(f"wrote {path}, {path.with_suffix('.md')} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
