"""Training into a run directory that already holds a run (``t2t_recipe.py train``, ``make
demo``): fairseq-train resumes its ``checkpoint_last.pt``, so a run asked for with other options
than the checkpoint's is refused before anything is written or run, naming the directory and each
option with its value there and now (docs/errors.md). The options a resume may change (the
budget, where the data and the run directory are) do not count, and an option an old checkpoint
lacks counts as the default it was trained with (``leap-feature-map``: relu).

Real runs of the recipe's train step at tiny size (a few updates on one CPU thread).
"""
import shutil
from pathlib import Path
from typing import Dict

import pytest
import torch

from leapformer_fairseq.recipes import t2t

ROOT = Path(__file__).resolve().parents[1]
TSV = ROOT / "data" / "gettext-mt" / "en-de.{split}.tsv"
UPDATES = 2
RELU = ("--set", "leap-feature-map=relu")


@pytest.fixture(scope="module", autouse=True)
def one_thread_training():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def train(data: Path, *flags: str, updates: int = UPDATES) -> None:
    """``t2t_recipe.py train`` of a tiny LeaP wait-2 model on ``data``, on the CPU."""
    t2t.main(["train", "--data", str(data), "--arch", "leapformer_waitk_transformer_tiny",
              "--waitk", "2", "--max-tokens", "1000", "--max-update", str(updates),
              "--warmup", "1", "--cpu", "--set", "log-interval=1", *flags])


def refusal(data: Path, *flags: str, updates: int = UPDATES) -> str:
    with pytest.raises(SystemExit) as refused:
        train(data, *flags, updates=updates)
    return str(refused.value.code)


def files(directory: Path) -> Dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def num_updates(checkpoint: Path) -> int:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return state["optimizer_history"][-1]["num_updates"]


def expected_refusal(run: Path) -> str:
    return (f"[t2t] train: {run} holds a run trained with other options, whose "
            "checkpoint_last.pt fairseq-train would resume (leap-feature-map: relu there, "
            "hedgehog now); delete the directory or choose another output directory")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The recipe's prepare on a slice of gettext-mt, and a relu run trained on it."""
    out = tmp_path_factory.mktemp("rerun") / "data"
    t2t.main(["prepare", "--corpus", str(TSV), "--out", str(out), "--max-train", "100",
              "--max-valid", "10", "--max-test", "2", "--vocab-size", "200"])
    train(out, *RELU)
    return out


def test_a_run_with_other_model_options_is_refused_before_anything_is_written(data, capsys):
    """The relu run asked for again with the default feature map (hedgehog): refused, the run
    directory as it was; asked for with its own options: resumed."""
    run = data / "runs" / "leap_k2"
    before = files(run)
    capsys.readouterr()
    assert refusal(data) == expected_refusal(run)  # the default feature map: hedgehog
    assert "fairseq_cli.train" not in capsys.readouterr().out  # fairseq-train never started
    assert files(run) == before  # config.yaml, checkpoints and log untouched

    train(data, *RELU)  # the same options: fairseq-train resumes the checkpoint
    assert f"Loaded checkpoint {run / 'checkpoint_last.pt'} (epoch 1 @ {UPDATES} updates)" \
        in (run / "train.log").read_text()


def test_a_checkpoint_without_the_feature_map_resumes_as_relu(data, tmp_path):
    """A checkpoint saved before ``--leap-feature-map`` existed (its args lack it), in a data
    directory moved elsewhere: refused with hedgehog, resumed with relu and a longer budget."""
    moved = tmp_path / "data"
    moved.mkdir()
    for path in data.iterdir():
        if path.name != "runs":
            (moved / path.name).symlink_to(path)
    run = shutil.copytree(data / "runs" / "leap_k2", moved / "runs" / "leap_k2")
    checkpoint = run / "checkpoint_last.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    del state["cfg"]["model"].leap_feature_map
    torch.save(state, checkpoint)
    start = num_updates(checkpoint)

    assert refusal(moved, updates=start + 2) == expected_refusal(run)
    train(moved, *RELU, updates=start + 2)
    assert f"Loaded checkpoint {checkpoint} (epoch 1 @ {start} updates)" \
        in (run / "train.log").read_text()
    assert num_updates(checkpoint) == start + 2
