"""Training throughput of a text-to-text wait-k model per attention type, each run alone:
updates/s and target tokens/s over a window of updates.

    python benchmarks/train_speed.py --data work/t2t --set fp16=true      # a GPU (device_speed.sh)
    python benchmarks/train_speed.py --data work/demo --config t2t/demo --window 20,60 \\
        --log-interval 20 --cpu

Each attention type (``--attn-types``, ``--repeats`` rounds: the types in the given order, then
reversed, and so on; ``TYPE+compiled``: TYPE with ``--compile-feature-map``) trains a fresh
model with ``scripts/t2t_recipe.py train`` (``--config``, ``--attn-type`` for every block,
``--set`` overrides) in its own folder under ``--work`` (its ``data-bin`` a link to
``--data``'s), one run after the other, for the window's last update, without validation or
checkpoints (what they cost is not training speed), logging every ``--log-interval`` updates;
both window ends must be multiples of it. From fairseq's ``train_inner`` lines after the
window's first update: each logged interval's tokens are ``wpb`` (target tokens per update)
times its updates, its time those tokens over its ``wps`` (fairseq times the whole interval,
data loading included); updates/s and tokens/s are the window's updates and tokens over the sum
of those times. Writes ``train_speed_<device>.{json,md,png}`` under ``--out`` with the command,
the machine and each run's precision, batch size and log.
"""
import argparse
import json
import logging
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from attention import invocation, machine_description  # noqa: E402

BASELINE = "softmax"
# --attn-types TYPE+VARIANT: TYPE trained with the variant's fairseq-train options
VARIANTS = {"compiled": ["--set", "compile-feature-map=true"]}
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
            interval_tokens = (update - previous) * row["wpb"]
            # tokens over fairseq's tokens/s of the interval: its time, with more digits than
            # updates over its (two-decimal) updates/s
            seconds += interval_tokens / row["wps"]
            tokens += interval_tokens
            previous = update
    return {"updates": last - first, "seconds": seconds, "target_tokens": tokens,
            "updates_per_s": (last - first) / seconds, "tokens_per_s": tokens / seconds,
            "wall_s": rows[updates.index(last)]["wall"] - rows[updates.index(first)]["wall"]}


def precision(options: Dict) -> str:
    """The training precision of resolved fairseq-train ``options``."""
    for flag in ("bf16", "fp16", "memory-efficient-bf16", "memory-efficient-fp16", "amp"):
        if options.get(flag):
            return flag
    return "fp32"


def run_order(attn_types: List[str], repeats: int) -> List[Tuple[int, str]]:
    """``(round, attention type)`` in the order they run: the types in the given order, then
    reversed, and so on (ABBA), so a drift of the machine falls on every type alike."""
    return [(round_index, attn_type) for round_index in range(repeats)
            for attn_type in (attn_types if round_index % 2 == 0 else attn_types[::-1])]


def run_one(attn_type: str, round_index: int, args) -> Dict:
    """Train ``attn_type`` from scratch for the window and measure it."""
    first, last = args.window
    data = Path(args.work) / f"{attn_type}_{round_index}"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    (data / "data-bin").symlink_to(Path(args.data, "data-bin").resolve())
    shutil.copy(Path(args.data, "recipe.json"), data / "recipe.json")
    base_type, _, variant = attn_type.partition("+")
    command = [sys.executable, str(ROOT / "scripts" / "t2t_recipe.py"), "train",
               "--data", str(data), "--config", args.config, "--attn-type", base_type,
               *VARIANTS.get(variant, []),
               "--max-update", str(last), "--set", f"log-interval={args.log_interval}",
               "--set", "disable-validation=true", "--set", "no-save=true",
               *[item for text in args.set for item in ("--set", text)],
               *(["--cpu"] if args.cpu else [])]
    print(f"[train_speed] {attn_type}: {' '.join(command)}", flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise SystemExit(f"[train_speed] training {attn_type} failed; its log is under {data}")
    (run,) = (data / "runs").iterdir()
    options = yaml.safe_load((run / "config.yaml").read_text())["fairseq-train"]
    try:
        result = window_throughput(train_inner(run / "train.log"), first, last)
    except ValueError as error:
        raise SystemExit(f"[train_speed] {run / 'train.log'}: {error}") from None
    return {"attn_type": attn_type, "round": round_index, "precision": precision(options),
            "arch": options["arch"],
            "max_tokens": options.get("max-tokens"), "log": str(run / "train.log"), **result}


def summarise(runs: List[Dict]) -> Dict[str, Dict]:
    """Per attention type: its runs' mean (and sample standard deviation, from two runs)
    updates/s and tokens/s, and its mean updates/s over the baseline's."""
    summary = {}
    for attn_type in dict.fromkeys(run["attn_type"] for run in runs):
        mine = [run for run in runs if run["attn_type"] == attn_type]
        summary[attn_type] = {"runs": len(mine)}
        for key in ("updates_per_s", "tokens_per_s"):
            values = [run[key] for run in mine]
            summary[attn_type][key] = statistics.mean(values)
            summary[attn_type][key + "_sd"] = statistics.stdev(values) if len(values) > 1 else None
    if BASELINE in summary:
        for row in summary.values():
            row[f"speed_vs_{BASELINE}"] = (row["updates_per_s"]
                                           / summary[BASELINE]["updates_per_s"])
    return summary


def markdown(report: Dict) -> str:
    first, last = report["window"]
    lines = ["# Training throughput", "", f"Command: `{report['command']}` (commit "
             f"{report['commit']})", "",
             "Machine: " + ", ".join(f"{k}={v}" for k, v in report["machine"].items()), "",
             f"Configuration `{report['config']}` on `{report['data']}`, each attention type "
             f"trained alone from scratch, without validation or checkpoints; updates "
             f"{first + 1}-{last} (fairseq's per-interval `wps` and `wpb`, logged every "
             f"{report['log_interval']} updates); {report['repeats']} round(s), the types in "
             "the given order, then reversed.", "",
             "| attention | runs | updates/s | target tokens/s | updates/s vs "
             f"{BASELINE} |", "|---|---|---|---|---|"]

    def spread(mean: float, sd: Optional[float], digits: int) -> str:
        return f"{mean:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")
    for attn_type, row in report["summary"].items():
        versus = row.get(f"speed_vs_{BASELINE}")
        lines.append(f"| {attn_type} | {row['runs']} | "
                     f"{spread(row['updates_per_s'], row['updates_per_s_sd'], 3)} | "
                     f"{spread(row['tokens_per_s'], row['tokens_per_s_sd'], 0)} | "
                     f"{'-' if versus is None else f'{versus:.3f}x'} |")
    lines += ["", "| run | attention | arch | precision | max tokens | updates/s | "
              "target tokens/s | seconds |", "|---|---|---|---|---|---|---|---|"]
    for number, run in enumerate(report["runs"], 1):
        lines.append(f"| {number} | {run['attn_type']} | {run['arch']} | {run['precision']} | "
                     f"{run['max_tokens']} | {run['updates_per_s']:.3f} | "
                     f"{run['tokens_per_s']:.0f} | {run['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(report: Dict, path: Path) -> None:
    import matplotlib
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(5, 4))
    summary = report["summary"]
    axis.bar(list(summary), [row["updates_per_s"] for row in summary.values()],
             yerr=[row["updates_per_s_sd"] or 0.0 for row in summary.values()], capsize=4)
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
                        help="attention types of every block, trained one after the other; "
                             "TYPE+compiled: TYPE with --compile-feature-map")
    parser.add_argument("--window", default="200,700",
                        help="FIRST,LAST: measure updates FIRST+1 .. LAST (default 200,700)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over the attention types, in the given order, then "
                             "reversed, and so on (default 1)")
    parser.add_argument("--log-interval", type=int, default=100,
                        help="fairseq's log interval; divides both window ends (default 100)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a fairseq-train option for every run (t2t_recipe.py's --set), "
                             "e.g. fp16=true, max-tokens=4096")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU")
    parser.add_argument("--work", default=str(ROOT / "work" / "train_speed"),
                        help="the runs' folders (replaced)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    try:
        args.window = [int(n) for n in args.window.split(",")]
    except ValueError:
        parser.error(f"--window: FIRST,LAST updates, got {args.window!r}")
    if len(args.window) != 2 or not 0 < args.window[0] < args.window[1]:
        parser.error(f"--window: FIRST,LAST with 0 < FIRST < LAST (fairseq logs no update 0), "
                     f"got {args.window}")
    for attn_type in args.attn_types.split(","):
        variant = attn_type.partition("+")[2]
        if variant and variant not in VARIANTS:
            parser.error(f"--attn-types {attn_type}: unknown variant {variant!r}; choose from "
                         f"{', '.join(VARIANTS)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
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
    runs = [run_one(attn_type, round_index, args)
            for round_index, attn_type in run_order(args.attn_types.split(","), args.repeats)]
    report = {**invocation(), "device": device, "machine": machine_description(device),
              "config": args.config, "data": args.data, "window": args.window,
              "log_interval": args.log_interval, "repeats": args.repeats, "runs": runs,
              "summary": summarise(runs)}
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
