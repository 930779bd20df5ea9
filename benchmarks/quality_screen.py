"""The screening table of quality studies: validation loss of every row along training.

    python benchmarks/quality_screen.py --study studies/t2t_screen_en_de \
        --study kd-=studies/t2t_kd_en_de --out benchmarks/results/t2t_quality_en_de/screen_en_de

Reads the ``run.json`` that ``scripts/study.py run`` wrote for every run of each study
(``--study [PREFIX=]NAME[@OUT]``: the first one holds the reference rows; ``PREFIX`` names the
rows of a later one apart, ``kd-leap``; ``OUT`` is the study's ``--out`` when it ran elsewhere,
``long-=studies/t2t_screen_en_de@work/studies/long``, and then only its rows with runs there are
listed) and writes ``OUT.json`` (every run's options,
validation curve, time and device, with the command, the commit and the machine), ``OUT.md``
(per row: validation loss at updates 250, 500, 750, 1,000, 1,500 and 2,000 as far as the
longest run goes, its difference
to the reference row of the same budget at the end, and how much of LeaP's gap to the reference
it closes) and ``OUT.png`` (the differences, and the curves).
A row fine-tuned from another checkpoint (``finetune-from-model``) counts the updates of that
checkpoint too. Rows without a finished run are listed as not run.
"""
import argparse
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib
import torch
from attention import invocation, machine_description  # benchmarks/attention.py

from leapformer_fairseq.recipes.study import ROOT, describe, fmt, load_study, run_directory

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

logging.getLogger("matplotlib").setLevel(logging.WARNING)

MARKS = (250, 500, 750, 1000, 1500, 2000)


def prior_updates(options: Dict) -> int:
    """Updates of the checkpoint a run was fine-tuned from (0 if it started from scratch)."""
    start = options.get("finetune-from-model")
    if not start:
        return 0
    state = torch.load(ROOT / start, map_location="cpu", weights_only=False)
    return int(state["optimizer_history"][-1]["num_updates"])


def study_runs(name: str, prefix: str, out: Optional[str]) -> List[Dict]:
    study = load_study(name)
    elsewhere = out is not None
    out = ROOT / (out or study.out or f"work/studies/{study.name}")
    runs = []
    for row, options in study.rows.items():
        for waitk in study.waitks:
            for seed in study.seeds:
                record_file = run_directory(out, row, waitk, seed) / "run.json"
                if elsewhere and not record_file.is_file():
                    continue
                record = json.loads(record_file.read_text()) if record_file.is_file() else {}
                entry = {"study": name, "row": prefix + row, "base_row": row,
                         "waitk": waitk, "seed": seed,
                         "options": {key: value for key, value in options},
                         "finished": bool(record.get("finished"))}
                if entry["finished"]:
                    offset = prior_updates(entry["options"])
                    entry.update(
                        updates=offset + record["updates"], prior_updates=offset,
                        valid_curve=[[offset + u, loss] for u, loss in record["valid_curve"]],
                        valid_loss=record["valid_loss"], train_seconds=record["train_seconds"],
                        device=record["sessions"][-1]["device"],
                        data=str(Path(record["data"]).relative_to(ROOT)),
                        command=record["sessions"][-1]["command"].replace(f"{ROOT}/", ""))
                runs.append(entry)
    return runs


def at(curve: List[List[float]], update: int) -> Optional[float]:
    return next((loss for u, loss in curve if u == update), None)


def summarise(runs: List[Dict], reference: str, baseline: str) -> List[Dict]:
    """Per run: its losses at MARKS, and at its last update against the reference and baseline
    rows' losses at that update: the first study's rows, else a later study's rows of the same
    name (a run of 2,000 updates against the longer runs' at 2,000)."""
    at_budget: Dict = {}
    for run in runs:
        if run["finished"]:
            for update, loss in run["valid_curve"]:
                at_budget.setdefault((run["base_row"], update), loss)
    rows = []
    for run in runs:
        row = {"row": run["row"], "study": run["study"], "finished": run["finished"],
               "options": run["options"]}
        if run["finished"]:
            loss = run["valid_loss"]
            ref = at_budget.get((reference, run["updates"]))
            base = at_budget.get((baseline, run["updates"]))
            row.update(updates=run["updates"], valid_loss=loss,
                       marks={m: at(run["valid_curve"], m) for m in MARKS},
                       minus_reference=None if ref is None else loss - ref,
                       gap_closed=None if None in (ref, base) or base == ref
                       else (base - loss) / (base - ref))
        rows.append(row)
    return rows


ATTENTION_KEYS = ("encoder-attn-type", "decoder-attn-type", "cross-attn-type")


def options_text(options: Dict) -> str:
    """The row's options, its three attention types as one: ``leap``, ``linear-softmax-softmax``."""
    types = [options.get(key) for key in ATTENTION_KEYS]
    parts = [types[0] if len(set(types)) == 1 else "-".join(map(str, types))]
    parts += [f"{key} {value}" for key, value in options.items()
              if key not in (*ATTENTION_KEYS, "finetune-from-model")]
    if "finetune-from-model" in options:
        parts.append("from the converted softmax checkpoint")
    return ", ".join(parts)


def markdown(rows: List[Dict], meta: Dict) -> str:
    longest = max((row["updates"] for row in rows if row["finished"]), default=0)
    marks = [mark for mark in MARKS if mark <= longest]
    lines = [f"# Quality screening: {meta['title']}", "",
             f"Command: `{meta['command']}`", "",
             f"Commit {meta['commit']}; machine: {meta['machine']['cpu']} "
             f"({meta['machine']['cpu_count']} cores); runs: {meta['devices']}.", "",
             f"Validation loss (label-smoothed cross-entropy, valid split) at updates "
             f"{', '.join(map(str, marks))}; `- {meta['reference']}`: the last loss minus the "
             f"{meta['reference']} row's at the same update; `gap closed`: the share of the "
             f"{meta['baseline']} row's gap to {meta['reference']} at that update that the row "
             f"closes (1: as good as {meta['reference']}, 0: as {meta['baseline']}, < 0: "
             "worse).", "",
             "| row | options | " + " | ".join(f"@{m}" for m in marks)
             + f" | - {meta['reference']} | gap closed |",
             "|---|---|" + "---|" * len(marks) + "---|---|"]
    for row in rows:
        if not row["finished"]:
            lines.append(f"| {row['row']} | {options_text(row['options'])} | not run |"
                         + " |" * (len(marks) + 1))
            continue
        lines.append(f"| {row['row']} | {options_text(row['options'])} | "
                     + " | ".join(fmt(row["marks"][m], 3) for m in marks)
                     + f" | {fmt(row['minus_reference'], 3, sign=True)} | "
                     f"{fmt(row['gap_closed'], 2)} |")
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict], runs: List[Dict], meta: Dict, path: Path) -> None:
    done = sorted((r for r in rows if r["finished"]), key=lambda r: r["valid_loss"])
    figure, (bars, curves) = plt.subplots(1, 2, figsize=(14, 0.32 * len(done) + 2.5))
    bars.barh([r["row"] for r in done], [r["minus_reference"] for r in done],
              color=["tab:green" if r["row"] == meta["reference"] else
                     "tab:red" if r["row"] == meta["baseline"] else "tab:blue" for r in done])
    bars.invert_yaxis()
    bars.axvline(0, color="black", linewidth=0.8)
    bars.set_xlabel(f"validation loss minus {meta['reference']}'s (last update)")
    shown = [r["row"] for r in done[:4]] + [meta["baseline"]]
    for run in runs:
        if run["finished"] and run["row"] in shown:
            updates, losses = zip(*[(u, loss) for u, loss in run["valid_curve"] if u >= 250])
            curves.plot(updates, losses, marker=".", label=run["row"])
    curves.set_xlabel("updates")
    curves.set_ylabel("validation loss")
    curves.set_title("the four best rows and " + meta["baseline"])
    curves.legend()
    figure.suptitle(meta["title"])
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", action="append", required=True,
                        help="[PREFIX=]study name; the first holds the reference rows")
    parser.add_argument("--reference", default="softmax", help="row compared with (softmax)")
    parser.add_argument("--baseline", default="leap", help="row whose gap is closed (leap)")
    parser.add_argument("--title", default="LeaP against softmax, gettext-mt en-de")
    parser.add_argument("--out", required=True, type=Path, help="OUT.{json,md,png}")
    args = parser.parse_args(argv)
    runs = []
    for item in args.study:
        prefix, _, name = item.rpartition("=")
        name, _, out = name.partition("@")
        runs += study_runs(name, prefix, out or None)
    rows = summarise(runs, args.reference, args.baseline)
    devices = sorted({describe(r["device"]) for r in runs if r["finished"]})
    meta = {"title": args.title, **invocation(), "machine": machine_description("cpu"),
            "devices": "; ".join(devices), "reference": args.reference,
            "baseline": args.baseline}
    text = markdown(rows, meta)
    print(text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {**meta, "rows": rows, "runs": runs}, indent=1) + "\n")
    plot(rows, runs, meta, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
