"""scripts/device_s2t.sh, the GPU machine's speech training, as a CPU smoke run at tiny size
(its documented smoke command): synthesis with the held-out voices, prepare, ASR then ST for
LeaP and softmax side by side, and what it hands back: compact fp16 checkpoints that load for
streaming with the original's weights rounded to fp16, the prepared text files, the logs."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from leapformer_fairseq.models.streaming import load_streaming_model

ROOT = Path(__file__).resolve().parents[1]
ATTN_TYPES = ("leap", "softmax")


@pytest.fixture(scope="module")
def device_run(tmp_path_factory):
    """The smoke run, with this interpreter's environment first on PATH (the script runs
    ``python3``, as in an activated virtualenv or after device_env.sh)."""
    root = tmp_path_factory.mktemp("device")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "MAX_TRAIN": "40", "MAX_TEST": "4",
           "ASR_MINUTES": "0.1", "ST_MINUTES": "0.1", "WORK": str(root / "work"),
           "OUT": str(root / "out"), "JOBS": "2",
           "TRAIN_ARGS": "--set arch=leapformer_s2t_waitk_tiny --set max-update=2 --cpu"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "device_s2t.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return root / "work", root / "out"


def test_it_hands_back_checkpoints_logs_and_the_prepared_text(device_run):
    work, out = device_run
    assert sorted(path.name for path in out.iterdir()) == sorted(
        ["data.tgz", "tts_corpus.json", *[f"st_{a}_k5.pt" for a in ATTN_TYPES],
         *[f"train_{a}.log" for a in ATTN_TYPES]])
    with tarfile.open(out / "data.tgz") as archive:
        assert {"recipe.json", "config_st.yaml", "gcmvn.npz", "spm_st.model"} <= \
            set(archive.getnames())
    corpus = json.loads((out / "tts_corpus.json").read_text())
    assert corpus["pairs"] == {"train": 40, "dev": 4, "tst-COMMON": 4, "tst-HE": 4}
    for attn_type in ATTN_TYPES:
        log = (out / f"train_{attn_type}.log").read_text()
        assert "train-asr" in log and "train-st" in log


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_compact_checkpoint_streams_with_the_weights_in_fp16(device_run, attn_type):
    work, out = device_run
    original = work / "data" / "runs" / f"st_{attn_type}_k5" / "checkpoint_last.pt"
    compact = out / f"st_{attn_type}_k5.pt"
    assert compact.stat().st_size < 0.3 * original.stat().st_size  # no Adam moments, fp16
    overrides = {"config_yaml": "config_st.yaml"}
    model, _ = load_streaming_model(str(compact), str(work / "data"), overrides=overrides)
    reference, _ = load_streaming_model(str(original), str(work / "data"), overrides=overrides)
    assert model.encoder.layers[0].self_attn.attn_type == attn_type
    weights, expected = model.state_dict(), reference.state_dict()
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert weights[name].dtype == tensor.dtype
        rounded = tensor.half().to(tensor.dtype) if tensor.is_floating_point() else tensor
        assert torch.equal(weights[name], rounded), name


def test_compact_refuses_what_is_no_checkpoint(tmp_path):
    def last_error_line(checkpoint: Path) -> str:
        done = subprocess.run([sys.executable, "-m", "leapformer_fairseq.compact", "--out",
                               str(tmp_path / "c.pt"), "--checkpoint", str(checkpoint)],
                              cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 1
        return done.stderr.strip().splitlines()[-1]

    assert last_error_line(tmp_path / "none.pt") == \
        f"[compact] --checkpoint {tmp_path / 'none.pt'}: no such file"
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    assert last_error_line(tmp_path / "other.pt") == (
        f"[compact] --checkpoint {tmp_path / 'other.pt'}: not a fairseq checkpoint (no model "
        "and cfg)")
    assert not (tmp_path / "c.pt").exists()
