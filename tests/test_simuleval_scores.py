"""Plain and computation-aware SimulEval scores (leapformer_fairseq.simuleval_scores).

Runs the real ``simuleval`` CLI twice, with and without ``--computation-aware``, on three short
generated 16 kHz wav files with the deterministic agent in ``simuleval_fixtures/`` (one word per
300 ms of audio read, 20 ms of sleep per policy call), then checks our scores against SimulEval's.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import soundfile

from leapformer_fairseq.simuleval_scores import (
    LATENCY_METRICS,
    SCORES_FILE,
    main,
    plain_and_computation_aware_scores,
    read_scores_tsv,
    write_scores_tsv,
)

AGENT = Path(__file__).parent / "simuleval_fixtures" / "word_per_chunk_agent.py"
SAMPLE_RATE = 16000
# (seconds of audio, reference); the agent writes ceil(ms / 300) words of its fixed sentence,
# so these under-, exactly and over-generate.
UTTERANCES = [
    (1.0, "the quick brown cat"),
    (1.3, "the quick brown fox jumps over the fence"),
    (1.75, "the quick brown fox"),
]
# scores.tsv is rounded to 3 decimals (simuleval/evaluator/evaluator.py:219).
ROUNDING = 1e-3


def _simuleval(workdir: Path, output: Path, *flags: str) -> None:
    command = [
        sys.executable, "-m", "simuleval.cli", "--agent", str(AGENT),
        "--source", str(workdir / "source.txt"), "--target", str(workdir / "target.txt"),
        "--source-segment-size", "200", "--eval-latency-unit", "word",
        "--quality-metrics", "BLEU", "--latency-metrics", *LATENCY_METRICS,
        "--output", str(output), "--no-progress-bar", "--compute-ms", "20", *flags,
    ]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Dict[str, Path]:
    """``plain`` and ``ca`` output dirs of the same agent run without and with
    ``--computation-aware``."""
    workdir = tmp_path_factory.mktemp("simuleval")
    sources = []
    for i, (seconds, _) in enumerate(UTTERANCES):
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        path = workdir / f"utt{i}.wav"
        soundfile.write(path, (0.1 * np.sin(2 * np.pi * 220 * t)).astype("float32"), SAMPLE_RATE)
        sources.append(str(path))
    (workdir / "source.txt").write_text("\n".join(sources) + "\n")
    (workdir / "target.txt").write_text("\n".join(ref for _, ref in UTTERANCES) + "\n")
    outputs = {"plain": workdir / "out_plain", "ca": workdir / "out_ca"}
    _simuleval(workdir, outputs["plain"])
    _simuleval(workdir, outputs["ca"], "--computation-aware")
    return outputs


def test_simuleval_computation_aware_run_has_the_defect(runs):
    """SimulEval 1.1.4 builds the plain scorers of a --computation-aware run with
    computation_aware=True (evaluator.py:288 -> latency_scorer.py:108-111), so its plain
    columns are the computation-aware ones. If this fails, SimulEval fixed it."""
    plain, aware = read_scores_tsv(runs["plain"] / "scores.tsv"), read_scores_tsv(
        runs["ca"] / "scores.tsv")
    for metric in LATENCY_METRICS:
        assert aware[metric] == aware[metric + "_CA"], f"{metric}: SimulEval's defect is gone"
        assert aware[metric] > plain[metric] + ROUNDING, f"{metric}: SimulEval's defect is gone"


def test_plain_scores_equal_simuleval_without_computation_aware(runs):
    ours = plain_and_computation_aware_scores(runs["ca"])
    simuleval = read_scores_tsv(runs["plain"] / "scores.tsv")
    assert ours["BLEU"] == pytest.approx(simuleval["BLEU"], abs=ROUNDING)
    for metric in LATENCY_METRICS:
        assert ours[metric] == pytest.approx(simuleval[metric], abs=ROUNDING), metric


def test_computation_aware_scores_equal_simuleval_and_exceed_plain(runs):
    ours = plain_and_computation_aware_scores(runs["ca"])
    simuleval = read_scores_tsv(runs["ca"] / "scores.tsv")
    assert list(ours) == list(simuleval)  # same columns, same order
    for metric in LATENCY_METRICS:
        assert ours[metric + "_CA"] == pytest.approx(simuleval[metric + "_CA"], abs=ROUNDING)
        assert ours[metric + "_CA"] == pytest.approx(simuleval[metric], abs=ROUNDING)
        assert ours[metric + "_CA"] > ours[metric], metric


def test_run_without_computation_aware_flag_also_has_elapsed_times(runs):
    """SimulEval records ``elapsed`` for speech input whatever the flag
    (instance.py:218-221), so a plain run gives both kinds of scores too."""
    ours = plain_and_computation_aware_scores(runs["plain"])
    simuleval = read_scores_tsv(runs["plain"] / "scores.tsv")
    for metric in LATENCY_METRICS:
        assert ours[metric] == pytest.approx(simuleval[metric], abs=ROUNDING), metric
        assert ours[metric + "_CA"] > ours[metric], metric


def test_tsv_round_trip_and_cli(runs, tmp_path, capsys):
    scores = plain_and_computation_aware_scores(runs["ca"])
    path = write_scores_tsv(scores, tmp_path / SCORES_FILE)
    assert len(path.read_text().splitlines()) == 2
    assert read_scores_tsv(path) == {name: round(value, 3) for name, value in scores.items()}

    output = tmp_path / "run"
    shutil.copytree(runs["ca"], output)
    assert main([str(output), "--sacrebleu-tokenizer", "13a"]) == scores
    assert read_scores_tsv(output / SCORES_FILE) == read_scores_tsv(path)
    assert capsys.readouterr().out == path.read_text()


def test_clear_errors(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "instances.log")):
        plain_and_computation_aware_scores(tmp_path)

    records = [json.loads(line) for line in (runs["ca"] / "instances.log").read_text().split("\n")
               if line]
    for record in records:
        record["elapsed"] = [0] * len(record["delays"])  # as text input records them
    (tmp_path / "instances.log").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match="without computation-aware timing") as error:
        plain_and_computation_aware_scores(tmp_path)
    assert str(tmp_path / "instances.log") in str(error.value)

    with pytest.raises(ValueError, match="--eval-latency-unit"):
        plain_and_computation_aware_scores(runs["ca"], latency_unit="char")
