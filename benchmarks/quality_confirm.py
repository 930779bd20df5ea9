"""The confirmation table of quality studies: SimulEval BLEU, AL and LAAL of each row against
the reference row (softmax) over seeds, and whether it reaches 97% of the reference's BLEU.

    python benchmarks/quality_confirm.py --study studies/t2t_confirm_en_de \
        --study studies/t2t_confirm_en_es --out benchmarks/results/t2t_quality_confirm/t2t_small

Reads what ``scripts/study.py run`` and ``evaluate`` recorded for each study, through the study
runner's own table (per row and k: mean and sample standard deviation over the evaluated seeds
of BLEU, AL and LAAL, of each seed's ratio BLEU(row) / BLEU(reference) and difference
AL(row) - AL(reference), and the largest p of sacrebleu's paired bootstrap over the seeds), and
writes ``OUT.json`` (the rows and every run, with the commands), ``OUT.md`` and ``OUT.png``
(per study, BLEU against AL: the means over seeds as curves over k, every seed as a dot).
A row reaches the target when its mean ratio is at least 0.97 and its mean AL difference within
0.3 words. A multi-path study (``studies/t2t_multipath_en_de``) gives one curve per multi-path
model beside the per-k models'.
"""
import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib
from attention import invocation, machine_description  # benchmarks/attention.py

from leapformer_fairseq.recipes.study import (
    ROOT,
    collect,
    curve_name,
    draw_curves,
    fmt,
    load_study,
    mean_std,
    read_json,
    waitk_label,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

logging.getLogger("matplotlib").setLevel(logging.WARNING)

TARGET_RATIO = 0.97
AL_TOLERANCE = 0.3


def study_results(name: str) -> Dict:
    """The study's table lines and runs as the runner computes them, for its last evaluation."""
    study = load_study(name)
    out = ROOT / (study.out or f"work/studies/{study.name}")
    settings = read_json(out / "evaluation.json")
    if settings is None:
        sys.exit(f"quality_confirm.py: {name} is not evaluated ({out / 'evaluation.json'} "
                 f"missing); run scripts/study.py evaluate {name} first")
    collected = collect(study, out, settings)
    for row in collected["rows"]:
        ratio, al_diff = row["bleu_ratio"]["mean"], row["al_diff"]["mean"]
        row["reaches_target"] = None if ratio is None or row["row"] == study.reference else \
            ratio >= TARGET_RATIO and abs(al_diff) <= AL_TOLERANCE
    shared = {key: value for key, value in study.config.options.items()
              if study.config.sources[key] == str(study.path)}
    return {"study": name, "reference": study.reference, "seeds": study.seeds,
            "evaluation": settings, "data": study.data, "shared_options": shared,
            "rows": collected["rows"], "runs": collected["runs"]}


def verdict(row: Dict, seeds: int) -> str:
    """yes / no, and on how many seeds when fewer than the study's were evaluated."""
    text = {None: "-", True: "yes", False: "no"}[row["reaches_target"]]
    evaluated = len(row["seeds_evaluated"])
    return text if text == "-" or evaluated == seeds else f"{text} ({evaluated} of {seeds} seeds)"


def markdown(studies: List[Dict], meta: Dict) -> str:
    lines = [f"# {meta['title']}", "", f"Command: `{meta['command']}`", "",
             f"Commit {meta['commit']}; machine: {meta['machine']['cpu']} "
             f"({meta['machine']['cpu_count']} cores). Training: {meta['devices']}. SimulEval "
             "1.1.4 with the text agent on the CPU, one torch thread.", "",
             "Mean ± sample standard deviation over the evaluated seeds. `BLEU / ref`: the mean "
             "over seeds of each seed's BLEU divided by the reference row's at the same k and "
             "seed; `AL - ref`: the mean of the per-seed AL differences (words); p: sacrebleu's "
             "paired bootstrap (1,000 resamples) against the reference row's run of the same "
             "seed, the largest over the seeds. `97%`: mean ratio >= 0.97 with the AL "
             "difference within 0.3. AL and LAAL are plain (non computation-aware): SimulEval "
             "1.1.4 records no elapsed time for text input (every `elapsed` is 0).", ""]
    for study in studies:
        evaluation = study["evaluation"]
        lines += [f"## {study['study']} ({study['data']})", "",
                  f"{evaluation['sentences'] or 'All'} test sentences, "
                  f"`{evaluation['checkpoint']}`; reference row `{study['reference']}`. "
                  "Every row's options over the study's base, besides its own: "
                  + ", ".join(f"`{key} {value}`" for key, value in
                              study["shared_options"].items()) + ".", "",
                  "| row | k | seeds evaluated | valid loss | BLEU | AL | LAAL | BLEU / ref | "
                  "AL - ref | p | 97% |", "|" + "---|" * 11]
        for row in study["rows"]:
            n = len(row["seeds_evaluated"])
            lines.append(
                f"| {row['row']} | {waitk_label(row['waitk'], row['trained'])} | "
                f"{n} of {len(study['seeds'])} | {mean_std(row['valid_loss'], 3)} | "
                f"{mean_std(row['BLEU'], 2)} | {mean_std(row['AL'], 2)} | "
                f"{mean_std(row['LAAL'], 2)} | {mean_std(row['bleu_ratio'], 3, n)} | "
                f"{fmt(row['al_diff']['mean'], 2, sign=True)} | {fmt(row['p_value'], 3)} | "
                f"{verdict(row, len(study['seeds']))} |")
        lines += ["", "| row | k | seed | valid loss | BLEU | AL | LAAL | BLEU / ref | AL - ref "
                  "| p |", "|" + "---|" * 10]
        for run in study["runs"]:
            scores = run.get("eval", {})
            if not run["finished"]:
                lines.append(f"| {run['row']} | {waitk_label(run['waitk'], run['trained'])} | "
                             f"{run['seed']} | not finished |" + " |" * 6)
                continue
            lines.append(
                f"| {run['row']} | {waitk_label(run['waitk'], run['trained'])} | {run['seed']} |"
                f" {fmt(run['valid_loss'], 3)} | {fmt(scores.get('BLEU'), 2)} | "
                f"{fmt(scores.get('AL'), 2)} | {fmt(scores.get('LAAL'), 2)} | "
                f"{fmt(scores.get('bleu_ratio'), 3)} | {fmt(scores.get('al_diff'), 2, sign=True)}"
                f" | {fmt(scores.get('p_value'), 3)} |")
        lines.append("")
    return "\n".join(lines)


def plot(studies: List[Dict], meta: Dict, path: Path) -> None:
    """Per study, the BLEU-AL curves of the means (``draw_curves``) and every seed as a dot."""
    figure, axes = plt.subplots(1, len(studies), figsize=(6.5 * len(studies), 4.8),
                                squeeze=False)
    for axis, study in zip(axes[0], studies):
        colours = draw_curves(axis, [row for row in study["rows"] if row["seeds_evaluated"]])
        for run in study["runs"]:
            if "eval" in run and curve_name(run) in colours:
                axis.scatter(run["eval"]["AL"], run["eval"]["BLEU"], s=14, alpha=0.4,
                             color=colours[curve_name(run)])
        axis.set_title(study["study"])
    figure.suptitle(meta["title"])
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", action="append", required=True,
                        help="an evaluated study (a name under configs/); repeatable")
    parser.add_argument("--title", default="Confirmation: LeaP against softmax at t2t/small")
    parser.add_argument("--out", required=True, type=Path, help="OUT.{json,md,png}")
    args = parser.parse_args(argv)
    studies = [study_results(name) for name in args.study]
    devices = sorted({device for study in studies for run in study["runs"]
                      for device in run["devices"]})
    meta = {"title": args.title, **invocation(), "machine": machine_description("cpu"),
            "devices": "; ".join(devices)}
    text = markdown(studies, meta)
    print(text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    record = json.dumps({**meta, "target": {"bleu_ratio": TARGET_RATIO,
                                            "al_tolerance": AL_TOLERANCE},
                         "studies": studies}, indent=1, default=str)
    args.out.with_suffix(".json").write_text(record.replace(f"{ROOT}/", "") + "\n")
    plot(studies, meta, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
