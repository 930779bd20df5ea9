"""Resume is exact: a LeaP wait-k ``fairseq-train`` run killed with SIGKILL right after its
checkpoint at update 10 and restarted with the same command ends, at update 20, with exactly the
parameters (and Adam state) of an uninterrupted run.

Dropout is on (0.1 on embeddings, attention values and FFN activations), so the test also shows
that the random state is restored: fairseq reseeds torch with ``seed + num_updates`` before every
update and reshuffles the batches of each epoch with ``seed + epoch``, and the checkpoint holds
the iterator's position inside the epoch. The kill lands mid-epoch, in epoch 2, and the resumed
run crosses another epoch boundary. Everything runs on one torch thread on the CPU, so both runs
do the same float operations in the same order: equality is exact (``torch.equal``), no
tolerance.

``--update-epoch-batch-itr True`` is needed for exactness once a run is resumed after epoch 1.
fairseq (0.12) groups sentences into batches with ``numpy_seed(seed + epoch)`` (ties between
sentences of equal length are broken at random) where ``epoch`` is the epoch the iterator is
*built* in; by default an uninterrupted run builds it once in epoch 1 and reuses those batches in
every epoch, while a run resumed in epoch N builds them in epoch N, so equal-length sentences that
straddle a batch boundary land in different batches after the resume (here from update 11: same
batch sizes, different sentences). With the flag every epoch rebuilds its batches with its own
seed, in both runs. Without it resume is still exact inside epoch 1.
"""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# fairseq logs this line once the checkpoint file is written *and* copied to checkpoint_last.pt
SAVED_AT_10 = re.compile(r"Saved checkpoint \S+checkpoint_\d+_10\.pt \(epoch \d+ @ 10 updates")


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    """300 training pairs of the built-in slice, SentencePiece 300, through the t2t recipe."""
    out = tmp_path_factory.mktemp("resume")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "t2t_recipe.py"), "prepare", "--corpus",
         str(ROOT / "data/gettext-mt/en-de.{split}.tsv"), "--out", str(out), "--max-train",
         "300", "--max-valid", "10", "--max-test", "2", "--vocab-size", "300"],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return out / "data-bin"


def train_command(data_bin: Path, save_dir: Path):
    return [sys.executable, "-m", "fairseq_cli.train", str(data_bin),
            "--user-dir", str(ROOT / "leapformer_fairseq"), "--task", "translation",
            "--arch", "leapformer_waitk_transformer_tiny", "--waitk-lagging", "3",
            "--share-all-embeddings", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
            "--clip-norm", "1.0", "--lr", "0.005", "--lr-scheduler", "inverse_sqrt",
            "--warmup-updates", "5", "--criterion", "label_smoothed_cross_entropy",
            "--label-smoothing", "0.1", "--dropout", "0.1", "--attention-dropout", "0.1",
            "--activation-dropout", "0.1", "--max-tokens", "1500", "--max-update", "20",
            "--save-dir", str(save_dir), "--no-epoch-checkpoints",
            "--save-interval-updates", "5", "--seed", "1", "--log-format", "simple",
            "--log-interval", "1", "--num-workers", "0", "--required-batch-size-multiple", "1",
            "--update-epoch-batch-itr", "True",  # batches built per epoch: see the docstring
            "--cpu"]


def train(command):
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def num_updates(checkpoint) -> int:
    return checkpoint["optimizer_history"][-1]["num_updates"]


def assert_same_tensors(expected, actual, what):
    """Every tensor of two (nested) state dicts is bit-for-bit equal."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and expected.dtype == actual.dtype \
            and expected.shape == actual.shape, what
        assert torch.equal(expected, actual), \
            f"{what}: max |diff| {(expected.double() - actual.double()).abs().max().item()}"
    elif isinstance(expected, dict):
        assert set(expected) == set(actual), what
        for key in expected:
            assert_same_tensors(expected[key], actual[key], f"{what}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), what
        for index, (a, b) in enumerate(zip(expected, actual)):
            assert_same_tensors(a, b, f"{what}[{index}]")
    else:
        assert expected == actual, what


def test_training_killed_after_a_checkpoint_resumes_exactly(data_bin, tmp_path):
    straight, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    train(train_command(data_bin, straight))

    # run 1: SIGKILL as soon as fairseq reports the update-10 checkpoint saved (the line comes
    # after checkpoint_last.pt has been copied); the next save is 5 updates later
    command = train_command(data_bin, resumed)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=ENV)
    log = []
    try:
        for line in process.stdout:
            log.append(line)
            if SAVED_AT_10.search(line):
                os.kill(process.pid, signal.SIGKILL)
                break
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL, "".join(log)[-4000:]
    assert not list(resumed.glob("checkpoint_*_15.pt")), \
        "the run reached its update-15 checkpoint before the kill landed"
    interrupted = load(resumed / "checkpoint_last.pt")
    assert num_updates(interrupted) == 10
    assert interrupted["extra_state"]["train_iterator"]["iterations_in_epoch"] > 0  # mid-epoch
    assert_same_tensors(load(next(straight.glob("checkpoint_*_10.pt")))["model"],
                        interrupted["model"], "model at update 10")

    # run 2: the same command picks up checkpoint_last.pt and trains to update 20
    output = train(command)
    assert re.search(r"Loaded checkpoint \S+checkpoint_last\.pt \(epoch \d+ @ 10 updates\)",
                     output), output[-4000:]
    expected, actual = load(straight / "checkpoint_last.pt"), load(resumed / "checkpoint_last.pt")
    assert num_updates(expected) == num_updates(actual) == 20
    assert actual["extra_state"]["train_iterator"]["epoch"] \
        > interrupted["extra_state"]["train_iterator"]["epoch"] >= 2  # crossed an epoch boundary
    assert_same_tensors(expected["model"], actual["model"], "model")
    assert_same_tensors(expected["last_optimizer_state"], actual["last_optimizer_state"],
                        "optimizer")
