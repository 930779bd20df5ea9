"""Converting a checkpoint to other attention types: what the two models share is copied, the new
parameters are a fresh model's, and fairseq-train fine-tunes from the result (which it refuses
to do from the unconverted checkpoint)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leapformer_fairseq.convert import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_command(data_bin: Path, save_dir: Path, attn_type: str, *extra: str):
    return [sys.executable, "-m", "fairseq_cli.train", str(data_bin),
            "--user-dir", str(ROOT / "leapformer_fairseq"), "--task", "translation",
            "--arch", "leapformer_waitk_transformer_tiny", "--waitk-lagging", "2",
            "--encoder-attn-type", attn_type, "--decoder-attn-type", attn_type,
            "--cross-attn-type", attn_type, "--share-all-embeddings", "--optimizer", "adam",
            "--lr", "0.005", "--criterion", "cross_entropy", "--max-tokens", "1500",
            "--max-update", "3", "--save-dir", str(save_dir), "--no-epoch-checkpoints",
            "--seed", "1", "--num-workers", "0", "--disable-validation", "--cpu", *extra]


def run(command):
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def softmax_checkpoint(tmp_path_factory):
    """A tiny softmax wait-2 model after 3 updates on 100 pairs of the built-in slice."""
    out = tmp_path_factory.mktemp("convert")
    code, output = run([sys.executable, str(ROOT / "scripts" / "t2t_recipe.py"), "prepare",
                        "--corpus", str(ROOT / "data/gettext-mt/en-de.{split}.tsv"),
                        "--out", str(out), "--max-train", "100", "--max-valid", "5",
                        "--max-test", "2", "--vocab-size", "200"])
    assert code == 0, output[-4000:]
    code, output = run(train_command(out / "data-bin", out / "softmax", "softmax"))
    assert code == 0, output[-4000:]
    return out / "softmax" / "checkpoint_last.pt", out / "data-bin"


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def fresh_state(state, seed: int):
    """The state dict of a new model with ``state``'s args, initialised after ``seed``."""
    from fairseq import tasks

    task = tasks.setup_task(state["cfg"]["task"])
    torch.manual_seed(seed)
    return task.build_model(state["cfg"]["model"]).state_dict()


def test_shared_parameters_are_copied_and_new_ones_freshly_initialised(softmax_checkpoint,
                                                                       tmp_path):
    checkpoint, _ = softmax_checkpoint
    main(["--checkpoint", str(checkpoint), "--attn-type", "leap", "--seed", "7",
          "--out", str(tmp_path / "leap.pt")])
    source, converted = load(checkpoint), load(tmp_path / "leap.pt")
    args = converted["cfg"]["model"]
    assert (args.encoder_attn_type, args.decoder_attn_type, args.cross_attn_type) == \
        ("leap", "leap", "leap")
    assert converted["last_optimizer_state"] is None
    new = set(converted["model"]) - set(source["model"])
    # the softmax model was trained with the default --leap-feature-map hedgehog, which the LeaP
    # blocks take: LeaP's MLPs and Hedgehog's maps are new
    modules = {"leap_q", "leap_k", "hedgehog_q", "hedgehog_k"}
    assert {next((part for part in name.split(".") if part in modules), name)
            for name in new} == modules
    assert set(source["model"]) <= set(converted["model"])
    for name, tensor in source["model"].items():
        assert torch.equal(converted["model"][name], tensor), name
    fresh = fresh_state(converted, seed=7)
    for name in new:
        assert torch.equal(converted["model"][name], fresh[name]), name
    # another seed, other new parameters
    other = fresh_state(converted, seed=8)
    assert any(not torch.equal(converted["model"][name], other[name]) for name in new)


def test_converting_back_drops_the_new_parameters(softmax_checkpoint, tmp_path, capsys):
    checkpoint, _ = softmax_checkpoint
    main(["--checkpoint", str(checkpoint), "--attn-type", "leap", "--out",
          str(tmp_path / "leap.pt")])
    main(["--checkpoint", str(tmp_path / "leap.pt"), "--attn-type", "softmax", "--out",
          str(tmp_path / "softmax.pt")])
    assert "dropped: 2 x encoder_attn.hedgehog_k.bias, " in capsys.readouterr().out
    source, back = load(checkpoint)["model"], load(tmp_path / "softmax.pt")["model"]
    assert set(source) == set(back)
    assert all(torch.equal(source[name], back[name]) for name in source)


def test_fairseq_train_fine_tunes_from_the_converted_checkpoint_only(softmax_checkpoint,
                                                                      tmp_path):
    checkpoint, data_bin = softmax_checkpoint
    code, output = run(train_command(data_bin, tmp_path / "direct", "leap",
                                     "--finetune-from-model", str(checkpoint)))
    assert code != 0 and "Cannot load model parameters" in output
    main(["--checkpoint", str(checkpoint), "--attn-type", "softmax-softmax-leap",
          "--out", str(tmp_path / "cross_leap.pt")])
    code, output = run(train_command(data_bin, tmp_path / "tuned", "softmax", "--cross-attn-type",
                                     "leap", "--finetune-from-model",
                                     str(tmp_path / "cross_leap.pt")))
    assert code == 0, output[-4000:]
    tuned = load(tmp_path / "tuned" / "checkpoint_last.pt")
    assert tuned["optimizer_history"][-1]["num_updates"] == 3  # counted from 0 again
    start = load(tmp_path / "cross_leap.pt")["model"]
    assert set(tuned["model"]) == set(start)
    assert not torch.equal(tuned["model"]["decoder.layers.0.encoder_attn.leap_q.0.weight"],
                           start["decoder.layers.0.encoder_attn.leap_q.0.weight"])


@pytest.mark.parametrize("attn_type, message", [
    ("leap-softmax", "--attn-type leap-softmax: one of"),
    ("quadratic", "--attn-type quadratic: one of"),
])
def test_bad_attention_types_are_refused(softmax_checkpoint, tmp_path, capsys, attn_type,
                                         message):
    checkpoint, _ = softmax_checkpoint
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint), "--attn-type", attn_type, "--out",
              str(tmp_path / "x.pt")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path / "none.pt"), "--attn-type", "leap", "--out",
              str(tmp_path / "x.pt")])
    assert f"--checkpoint {tmp_path / 'none.pt'}: no such file" in capsys.readouterr().err
