"""The table of a screen of speech training choices: validation loss of every run along training.

    python benchmarks/s2t_screen.py --arm base=RUN,RUN --arm decoder=RUN,RUN \
        --reference base --out benchmarks/results/s2t_screen_tts_gettext_en_de/st_screen

Each ``--arm NAME=RUN[,RUN...]`` names one choice and its runs (one per seed): folders that
``s2t_recipe.py train-asr`` / ``train-st`` trained into (``config.yaml``, ``train.log``). Reads
every validation line of each run's ``train.log`` and writes ``OUT.json`` (every run's
configuration, seed, train feature transforms, encoder start and curve, with the command, the
commit and the machine), ``OUT.md`` (per
arm: mean and sample standard deviation over its runs of the validation ``nll_loss`` at each
``--marks`` update, and the difference to the reference arm; then every run) and ``OUT.png``
(the curves). ``nll_loss`` is compared, not ``loss``: the label-smoothed loss, and with CTC its
term too, are not the same quantity across arms.
"""
import argparse
import json
import re
import shlex
import statistics
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib
import yaml
from attention import invocation, machine_description  # benchmarks/attention.py

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VALID = re.compile(r"valid on '[^']+' subset \| loss (?P<loss>[\d.]+) \| "
                   r"nll_loss (?P<nll>[\d.]+) .*\| num_updates (?P<updates>\d+)")


def read_run(folder: Path) -> Dict:
    """A run's configuration (the first line of its ``config.yaml``), seed, the checkpoint its
    encoder started from, its train split's feature transforms (from the data config its
    fairseq-train command names) and validation curve ``[(updates, loss, nll_loss)]``; a folder
    without both files is refused naming it."""
    config, log = folder / "config.yaml", folder / "train.log"
    for path in (config, log):
        if not path.is_file():
            raise SystemExit(f"[s2t_screen] {path} not found (a train-asr / train-st run folder "
                             "is expected)")
    text = config.read_text(encoding="utf-8")
    options = yaml.safe_load(text)["fairseq-train"]
    command = shlex.split(text.splitlines()[1].removeprefix("# fairseq-train "))
    data = Path(command[0])
    data_config = yaml.safe_load((data / command[command.index("--config-yaml") + 1]).read_text(
        encoding="utf-8"))
    train_subset = command[command.index("--train-subset") + 1]
    transforms = data_config.get("feature_transforms", {})
    encoder = (command[command.index("--load-pretrained-encoder-from") + 1]
               if "--load-pretrained-encoder-from" in command else None)
    curve = {}
    for match in VALID.finditer(log.read_text(encoding="utf-8")):
        curve[int(match["updates"])] = (float(match["loss"]), float(match["nll"]))
    if not curve:
        raise SystemExit(f"[s2t_screen] {log}: no validation line")
    return {"folder": str(folder),
            "configuration": text.splitlines()[0].removeprefix(
                "# The configuration of this run: "),
            "seed": options.get("seed"), "encoder_from": encoder,
            "train_transforms": transforms.get(train_subset, transforms.get("*", [])),
            "curve": [[updates, *values] for updates, values in sorted(curve.items())]}


def nll_at(run: Dict, updates: int) -> Optional[float]:
    """``nll_loss`` of the validation at ``updates``, or None if the run has none there."""
    return next((nll for step, _, nll in run["curve"] if step == updates), None)


def summary_row(runs: List[Dict], marks: List[int]) -> Dict[int, List[float]]:
    return {mark: [value for value in (nll_at(run, mark) for run in runs) if value is not None]
            for mark in marks}


def fmt(values: List[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown(report: Dict) -> str:
    marks, reference = report["marks"], report["reference"]
    arms = report["arms"]
    lines = [f"# {report['title']}", "", f"Command: `{report['command']}`", "",
             f"Commit {report['commit']}; summarised on {report['machine']['cpu']} "
             f"({report['machine']['cpu_count']} cores).", "",
             "Validation `nll_loss` (base 2), mean ± sample standard deviation over each arm's "
             f"runs; `- {reference}`: the difference of the means at the last mark.", "",
             "| arm | runs | " + " | ".join(f"nll @ {m}" for m in marks) + f" | - {reference} |",
             "|---|---|" + "---|" * (len(marks) + 1)]
    last = marks[-1]
    base = summary_row(arms[reference], marks)[last]
    for name, runs in arms.items():
        values = summary_row(runs, marks)
        difference = (f"{statistics.mean(values[last]) - statistics.mean(base):+.3f}"
                      if values[last] and base else "-")
        lines.append(f"| {name} | {len(runs)} | "
                     + " | ".join(fmt(values[m]) for m in marks) + f" | {difference} |")
    lines += ["", "| arm | seed | " + " | ".join(f"nll @ {m}" for m in marks)
              + " | train features | encoder from | configuration |",
              "|---|---|" + "---|" * (len(marks) + 3)]
    for name, runs in arms.items():
        for run in runs:
            cells = [fmt([v]) if (v := nll_at(run, m)) is not None else "-" for m in marks]
            lines.append(f"| {name} | {run['seed']} | " + " | ".join(cells)
                         + f" | {', '.join(run['train_transforms'])} | "
                         f"{run['encoder_from'] or '-'} | {run['configuration']} |")
    return "\n".join(lines) + "\n"


def plot(report: Dict, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, runs) in enumerate(report["arms"].items()):
        for number, run in enumerate(runs):
            steps = [step for step, _, _ in run["curve"]]
            axes.plot(steps, [nll for _, _, nll in run["curve"]], marker="o", markersize=3,
                      color=colours[index % len(colours)], label=name if number == 0 else None)
    axes.set_xlabel("updates")
    axes.set_ylabel("validation nll_loss (base 2)")
    axes.set_title(report["title"], fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", required=True, metavar="NAME=RUN[,RUN...]",
                        help="one choice and its run folders (one per seed); repeatable")
    parser.add_argument("--reference", required=True, help="the arm the others are compared to")
    parser.add_argument("--marks", default="250,500", help="updates to tabulate")
    parser.add_argument("--title", default="Speech training screen")
    parser.add_argument("--out", required=True, help="writes OUT.json, OUT.md and OUT.png")
    args = parser.parse_args()
    arms = {}
    for spec in args.arm:
        name, _, folders = spec.partition("=")
        if not name or not folders:
            raise SystemExit(f"[s2t_screen] --arm {spec}: expected NAME=RUN[,RUN...]")
        arms[name] = [read_run(Path(folder)) for folder in folders.split(",")]
    if args.reference not in arms:
        raise SystemExit(f"[s2t_screen] --reference {args.reference}: no such --arm "
                         f"({', '.join(arms)})")
    report = {"title": args.title, **invocation(),
              "machine": machine_description("cpu"), "reference": args.reference,
              "marks": [int(mark) for mark in args.marks.split(",")], "arms": arms}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    plot(report, out.with_suffix(".png"))
    print(markdown(report))


if __name__ == "__main__":
    main()
