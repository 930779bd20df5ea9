"""Speech agent on long streams: compute per second of audio, streaming vs ``--recompute``, and
plain vs computation-aware AL.

    python benchmarks/speech_streaming.py \
        --checkpoint work/demo-s2t/runs/st_leap_k3/checkpoint_last.pt --data-dir work/demo-s2t

Streams of ``--lengths`` seconds (default 10, 30, 60) are built by concatenating the data
directory's evaluation wavs (``eval.wav_list``, from ``scripts/s2t_recipe.py prepare``). For each
stream and mode the ``simuleval`` CLI runs the speech agent with ``--computation-aware`` on that
one wav. From its instances.log: the agent's compute time (final elapsed minus final delay, i.e.
the wall-clock time the agent spent beyond the audio it had read), per second of audio; and AL
plain and computation-aware (:mod:`leapformer_fairseq.simuleval_scores`). Streaming ``leap``
does O(1) work per new frame, so its compute per second of audio stays flat; ``--recompute``
re-encodes the whole prefix at every step, so its compute per second grows with the stream.

Writes ``benchmarks/results/speech_streaming_cpu.{json,md,png}`` (``--out``).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import soundfile
import torch

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "simuleval_agents" / "leap_waitk_speech_agent.py"
MODES = ("streaming", "recompute")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def build_stream(wavs: List[str], references: List[str], seconds: float,
                 path: Path) -> Tuple[float, str]:
    """Concatenate the wavs (cycling) until ``seconds`` of 16 kHz audio, cut there; returns its
    length and the references of the utterances it holds."""
    needed = int(seconds * 16000)
    pieces, texts, total = [], [], 0
    while total < needed:
        for wav, reference in zip(wavs, references):
            samples, rate = soundfile.read(wav, dtype="int16")
            if rate != 16000:
                raise SystemExit(f"{wav}: {rate} Hz, expected 16000")
            pieces.append(samples)
            texts.append(reference)
            total += len(samples)
            if total >= needed:
                break
    audio = np.concatenate(pieces)[:needed]
    soundfile.write(path, audio, 16000, subtype="PCM_16")
    return len(audio) / 16000, " ".join(texts)


def run_agent(args, wav: Path, reference: str, mode: str, output: Path) -> Dict:
    from leapformer_fairseq.simuleval_scores import plain_and_computation_aware_scores

    output.mkdir(parents=True, exist_ok=True)
    (output / "source.txt").write_text(f"{wav}\n")
    (output / "target.txt").write_text(reference + "\n", encoding="utf-8")
    (output / "instances.log").unlink(missing_ok=True)
    command = [sys.executable, "-m", "simuleval.cli", "--agent", str(AGENT),
               "--source", str(output / "source.txt"), "--target", str(output / "target.txt"),
               "--source-type", "speech", "--target-type", "text",
               "--checkpoint", args.checkpoint, "--data-dir", args.data_dir,
               "--config-yaml", args.config_yaml, "--output", str(output),
               "--source-segment-size", str(args.segment_ms), "--quality-metrics", "BLEU",
               "--latency-metrics", "AL", "--eval-latency-unit", "word",
               "--computation-aware", *(["--recompute"] if mode == "recompute" else [])]
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"simuleval failed for {wav} ({mode}):\n{done.stdout[-3000:]}"
                         f"{done.stderr[-3000:]}")
    instance = json.loads((output / "instances.log").read_text().splitlines()[0])
    scores = plain_and_computation_aware_scores(output, ("AL",), ("BLEU",), "word")
    compute_ms = instance["elapsed"][-1] - instance["delays"][-1]
    return {"compute_ms": compute_ms, "AL": scores["AL"], "AL_CA": scores["AL_CA"],
            "words": len(instance["delays"]), "wall_s": time.time() - started}


def markdown(report: Dict) -> str:
    lines = [
        "# Speech agent on long streams",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}  ",
        f"Checkpoint: `{report['checkpoint']}`, SimulEval segments of {report['segment_ms']} ms, "
        "`--computation-aware`; compute = final elapsed - final delay of the one instance.",
        "",
        "| stream (s) | mode | compute (s) | compute per s of audio (ms) | words | AL (ms) "
        "| AL_CA (ms) | AL_CA - AL (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['seconds']:.0f} | {row['mode']} | {row['compute_ms'] / 1000:.2f} | "
            f"{row['compute_ms'] / row['seconds']:.1f} | {row['words']} | {row['AL']:.0f} | "
            f"{row['AL_CA']:.0f} | {row['AL_CA'] - row['AL']:.0f} |")
    lines += ["", "Recompute / streaming compute per second of audio, same run:", ""]
    for seconds, ratio in report["ratios"].items():
        lines.append(f"- {seconds} s stream: {ratio:.1f}x")
    return "\n".join(lines) + "\n"


def plot(report: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        rows = [r for r in report["rows"] if r["mode"] == mode]
        left.plot([r["seconds"] for r in rows], [r["compute_ms"] / r["seconds"] for r in rows],
                  "o-", label=mode)
        right.plot([r["seconds"] for r in rows], [r["AL"] for r in rows], "o-",
                   label=f"{mode} AL")
        right.plot([r["seconds"] for r in rows], [r["AL_CA"] for r in rows], "s--",
                   label=f"{mode} AL_CA")
    left.set(xlabel="stream length (s)", ylabel="agent compute per s of audio (ms)",
             title="compute per second of audio")
    right.set(xlabel="stream length (s)", ylabel="latency (ms)", title="AL vs AL_CA")
    left.legend()
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a leapformer_s2t_waitk checkpoint")
    parser.add_argument("--data-dir", required=True,
                        help="its prepared data (config, CMVN, eval.wav_list)")
    parser.add_argument("--config-yaml", default="config_st.yaml")
    parser.add_argument("--lengths", default="10,30,60", help="stream lengths in seconds")
    parser.add_argument("--segment-ms", type=int, default=200,
                        help="SimulEval --source-segment-size")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    for path in (Path(args.checkpoint), Path(args.data_dir) / "eval.wav_list"):
        if not path.is_file():
            raise SystemExit(f"missing {path} (--checkpoint / --data-dir)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = ROOT / "work" / "speech_streaming"
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data_dir)
    wavs = (data / "eval.wav_list").read_text().split()
    lang = json.loads((data / "recipe.json").read_text())["lang"]
    references = (data / f"eval.{lang}").read_text(encoding="utf-8").splitlines()
    rows = []
    for seconds in (float(s) for s in args.lengths.split(",")):
        wav = work / f"stream_{seconds:.0f}s.wav"
        length, reference = build_stream(wavs, references, seconds, wav)
        for mode in MODES:
            result = run_agent(args, wav, reference, mode, work / f"{mode}_{seconds:.0f}s")
            rows.append({"seconds": length, "mode": mode, **result})
            print(f"[speech] {length:5.1f} s {mode:9s} compute {result['compute_ms'] / 1000:7.2f} s"
                  f"  ({result['compute_ms'] / length:7.1f} ms per s of audio)  AL "
                  f"{result['AL']:7.0f}  AL_CA {result['AL_CA']:7.0f}", flush=True)
    ratios = {}
    for seconds in sorted({r["seconds"] for r in rows}):
        by_mode = {r["mode"]: r["compute_ms"] for r in rows if r["seconds"] == seconds}
        ratios[f"{seconds:.0f}"] = by_mode["recompute"] / by_mode["streaming"]
    report = {
        "command": " ".join(["python", "benchmarks/speech_streaming.py", *sys.argv[1:]]),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "checkpoint": args.checkpoint, "segment_ms": args.segment_ms, "rows": rows,
        "ratios": ratios,
    }
    json_path = out / "speech_streaming_cpu.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    json_path.with_suffix(".md").write_text(table)
    plot(report, json_path.with_suffix(".png"))
    print(table)
    print(f"wrote {json_path} and its .md and .png")


if __name__ == "__main__":
    main()
