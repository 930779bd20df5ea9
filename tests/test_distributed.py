"""Data-parallel training on the CPU: two fairseq-train processes joined by torch.distributed
(gloo) through ``python -m leapformer_fairseq.launch`` train the same parameters as one process
with ``--update-freq 2`` (tiny LeaP wait-k model, dropout 0, 20 updates), and differ from one
process without it, so the comparison can fail. The launcher's refusals."""
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from leapformer_fairseq.recipes import t2t

ROOT = Path(__file__).resolve().parents[1]
TSV = ROOT / "data" / "gettext-mt" / "en-de.{split}.tsv"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "data"
    t2t.main(["prepare", "--corpus", str(TSV), "--out", str(out), "--max-train", "300",
              "--max-valid", "10", "--max-test", "5", "--vocab-size", "200"])
    return out / "data-bin"


def train_args(data_bin: Path, save_dir: Path) -> List[str]:
    return [str(data_bin), "--user-dir", str(ROOT / "leapformer_fairseq"), "--task",
            "translation", "--arch", "leapformer_waitk_transformer_tiny", "--waitk-lagging", "3",
            "--share-all-embeddings", "--dropout", "0", "--attention-dropout", "0",
            "--activation-dropout", "0", "--optimizer", "adam", "--lr", "0.001",
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5", "--criterion",
            "label_smoothed_cross_entropy", "--max-tokens", "300", "--max-update", "20",
            "--seed", "1", "--cpu", "--no-epoch-checkpoints", "--disable-validation",
            "--num-workers", "0", "--log-format", "simple", "--save-dir", str(save_dir)]


def weights(save_dir: Path) -> Dict[str, torch.Tensor]:
    state = torch.load(save_dir / "checkpoint_last.pt", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 20
    return state["model"]


def largest_difference(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_two_processes_train_what_one_trains_with_update_freq_2(data_bin, tmp_path):
    two = subprocess.run([sys.executable, "-m", "leapformer_fairseq.launch", "--nproc", "2",
                          "--", *train_args(data_bin, tmp_path / "two")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    for rank in (0, 1):
        assert f"as rank {rank}" in two.stdout + two.stderr
    for update_freq in ("2", "1"):
        one = subprocess.run([sys.executable, "-m", "fairseq_cli.train",
                              *train_args(data_bin, tmp_path / f"one_{update_freq}"),
                              "--update-freq", update_freq],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert one.returncode == 0, one.stderr[-3000:]
    assert largest_difference(weights(tmp_path / "two"), weights(tmp_path / "one_2")) <= 1e-5
    assert largest_difference(weights(tmp_path / "two"), weights(tmp_path / "one_1")) > 1e-3


def launch_error(arguments: List[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "leapformer_fairseq.launch", *arguments],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    return done.stderr.strip().splitlines()[-1]


def test_the_launcher_refuses_what_it_cannot_run(tmp_path):
    assert launch_error(["--nproc", "1", "--", "data"]) == \
        "[launch] --nproc 1: use fairseq-train itself for one process"
    assert launch_error(["--nproc", "2"]) == "[launch] no fairseq-train arguments after --"
    assert launch_error(["--nproc", "2", "--", "data", "--distributed-world-size", "4"]) == \
        "[launch] --distributed-world-size is set by the launcher; leave it out"
    assert launch_error(["--nproc", "2", "--", str(tmp_path / "nowhere"), "--task",
                         "translation", "--arch", "transformer", "--cpu"]).startswith(
        "[launch] rank ")
