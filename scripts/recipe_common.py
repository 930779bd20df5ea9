"""What the recipes share: timestamped logs, commands that stop the recipe with a message naming
the step, SimulEval runs in parallel, and the results table with its BLEU-vs-latency plot."""
import json
import logging
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

ROOT = Path(__file__).resolve().parents[1]
Item = TypeVar("Item")


class Recipe:
    """Logging and command running for one recipe, tagged ``[tag HH:MM:SS]``."""

    def __init__(self, tag: str):
        self.tag = tag

    def log(self, message: str) -> None:
        print(f"[{self.tag} {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def fail(self, message: str) -> SystemExit:
        return SystemExit(f"[{self.tag}] {message}")

    def run(self, command: Sequence, what: str, log_file: Optional[Path] = None) -> None:
        """Run a command from the repository root, its output on the terminal (or in
        ``log_file``); stop with a message naming the step if it fails."""
        command = [str(c) for c in command]
        self.log(f"{what}: {' '.join(command)}" + (f" > {log_file}" if log_file else ""))
        if log_file is None:
            done = subprocess.run(command, cwd=ROOT)
        else:
            with open(log_file, "w") as output:
                done = subprocess.run(command, cwd=ROOT, stdout=output,
                                      stderr=subprocess.STDOUT)
        if done.returncode != 0:
            where = f"; its output is in {log_file}" if log_file else ""
            raise self.fail(f"{what} failed (exit code {done.returncode}){where}")

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
        (out / "results.md").write_text(table)
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(table)

        import matplotlib
        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # SimulEval logs at DEBUG
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
        figure.savefig(out / "bleu_vs_al.png", dpi=110)
        self.log(f"evaluate: {out / 'results.md'}, {out / 'bleu_vs_al.png'}")
