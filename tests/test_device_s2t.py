"""scripts/device_s2t.sh, the GPU machine's speech training, as a CPU smoke run at tiny size
(its documented smoke command): synthesis with the held-out voices, prepare, ASR then ST for
LeaP and softmax side by side, and what it hands back: compact fp16 checkpoints that load for
streaming with the original's weights rounded to fp16, the prepared text files, the logs. Then
the other side: ``s2t_recipe.py receive`` of that output with the test sets synthesised here,
and evaluation from it."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from leapformer_fairseq.models.streaming import load_streaming_model

ROOT = Path(__file__).resolve().parents[1]
ATTN_TYPES = ("leap", "softmax")
CORPUS = "data/gettext-mt-full/en-de.{split}.tsv"  # device_s2t.sh's default, from the root


@pytest.fixture(scope="module")
def device_run(tmp_path_factory):
    """The smoke run, with this interpreter's environment first on PATH (the script runs
    ``python3``, as in an activated virtualenv or after device_env.sh)."""
    root = tmp_path_factory.mktemp("device")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "MAX_TRAIN": "40", "MAX_TEST": "4",
           "T2T_MINUTES": "0.1", "ASR_MINUTES": "0.1", "ST_MINUTES": "0.1", "CTC_WEIGHT": "0.3",
           "WORK": str(root / "work"), "OUT": str(root / "out"), "JOBS": "2",
           "TRAIN_ARGS": "--set arch=leapformer_s2t_waitk_tiny --set max-update=2 --cpu",
           "T2T_ARGS": "--set arch=leapformer_waitk_transformer_tiny --set encoder-embed-dim=64 "
                       "--set decoder-embed-dim=64 --set decoder-ffn-embed-dim=128 "
                       "--set decoder-layers=1 --set decoder-attention-heads=2 "
                       "--set required-batch-size-multiple=1 --set max-update=2 --cpu"}
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
        assert "ctc_loss" in log  # ASR pre-training with CTC on the encoder
        assert f"loaded the decoder from {work}/t2t/runs/{attn_type}_k3/checkpoint_last.pt" in log
    # the translations' vocabulary is the text model's
    with tarfile.open(out / "data.tgz") as archive:
        assert archive.extractfile("spm_st.model").read() == \
            (work / "t2t" / "spm.model").read_bytes()


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


def recipe(*arguments, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "s2t_recipe.py"), *map(
        str, arguments)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert not check or done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


@pytest.fixture(scope="module")
def received(device_run, tmp_path_factory):
    """The two test sets synthesised here (``--splits``) with the smoke run's settings, then
    ``receive`` of its output into ``data``."""
    _, out = device_run
    root = tmp_path_factory.mktemp("received")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tts_corpus.py"),
                           "--corpus", CORPUS, "--out", str(root / "tts"), "--max-test", "4",
                           "--splits", "tst-COMMON,tst-HE", "--jobs", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    recipe("receive", "--from", out, "--data-root", root / "tts", "--out", root / "data")
    return root


def digests(folder: Path) -> dict:
    return {path.name: hashlib.md5(path.read_bytes()).hexdigest()
            for path in sorted(folder.glob("*.wav"))}


def test_receive_sets_up_the_same_test_sets_and_the_checkpoints(device_run, received):
    work, out = device_run
    data = received / "data"
    assert sorted(path.name for path in (received / "tts" / "en-de" / "data").iterdir()) == \
        ["tst-COMMON", "tst-HE"]
    for split in ("tst-COMMON", "tst-HE"):  # the same audio on both machines
        wavs = [root / "tts" / "en-de" / "data" / split / "wav" for root in (work, received)]
        assert digests(wavs[0]) == digests(wavs[1]) != {}
    for test_set in ("eval", "heldout"):
        assert (data / f"{test_set}.de").read_text() == \
            (work / "data" / f"{test_set}.de").read_text()
        assert len((data / f"{test_set}.wav_list").read_text().splitlines()) == 4
    config = (data / "config_st.yaml").read_text()
    assert str((data / "spm_st.model").resolve()) in config and str(work) not in config
    for attn_type in ATTN_TYPES:
        assert (data / "runs" / f"st_{attn_type}_k5" / "checkpoint_last.pt").read_bytes() == \
            (out / f"st_{attn_type}_k5.pt").read_bytes()


def test_received_models_score_as_on_the_device_side(device_run, received):
    """The compact LeaP checkpoint evaluated from the received folder and from the device's own
    folder: the same hypotheses, BLEU and (non-computation-aware) latency."""
    work, out = device_run
    device_run_dir = work / "data" / "runs" / "st_leap_k5"
    shutil.copyfile(out / "st_leap_k5.pt", device_run_dir / "compact.pt")
    scores = {}
    for side, data, name in (("here", received / "data", "checkpoint_last.pt"),
                             ("device", work / "data", "compact.pt")):
        recipe("evaluate", "--data", data, "--attn-types", "leap", "--sentences", "2",
               "--test-set", "heldout", "--checkpoint-name", name)
        instances = [json.loads(line) for line in
                     (data / "heldout" / "leap_k5" / "instances.log").read_text().splitlines()]
        scores[side] = [(i["prediction"], i["delays"]) for i in instances]
        assert len(instances) == 2
    assert scores["here"] == scores["device"]


def test_receive_refuses_a_synthesis_with_other_settings(device_run, received, tmp_path):
    _, out = device_run
    local = tmp_path / "tts" / "en-de" / "tts_corpus.json"
    local.parent.mkdir(parents=True)
    settings = json.loads((received / "tts" / "en-de" / "tts_corpus.json").read_text())
    local.write_text(json.dumps({**settings, "seed": 2}))
    done = recipe("receive", "--from", out, "--data-root", tmp_path / "tts", "--out",
                  tmp_path / "data", check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == \
        f"[s2t] receive: {local}: seed is 2, the device synthesised with 1"
    assert not (tmp_path / "data").exists()
    local.write_text(json.dumps({**settings, "pairs": {**settings["pairs"], "tst-HE": 3}}))
    done = recipe("receive", "--from", out, "--data-root", tmp_path / "tts", "--out",
                  tmp_path / "data", check=False)
    assert done.stderr.strip().splitlines()[-1] == (
        f"[s2t] receive: {local}: tst-HE has 3 pairs, the device's 4 (make_tts_corpus.py "
        "--max-test)")
    done = recipe("receive", "--from", tmp_path, "--data-root", tmp_path / "tts", "--out",
                  tmp_path / "data", check=False)
    assert done.stderr.strip().splitlines()[-1] == (
        f"[s2t] receive: {tmp_path / 'data.tgz'} not found; --from is the OUT folder of "
        "scripts/device_s2t.sh")


def test_the_screen_table_reads_each_runs_validation(device_run, tmp_path):
    """benchmarks/s2t_screen.py over the smoke run's ST folders, softmax the reference: each
    run's curve is its log's validation lines, and the table's difference that of the means."""
    work, _ = device_run
    runs = {attn_type: work / "data" / "runs" / f"st_{attn_type}_k5" for attn_type in ATTN_TYPES}
    out = tmp_path / "st_screen"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "s2t_screen.py"), "--reference", "softmax",
         *[item for a in ATTN_TYPES for item in ("--arm", f"{a}={runs[a]}")], "--marks", "2",
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    nll = {}
    for attn_type, folder in runs.items():
        lines = [line.split(" | ") for line in (folder / "train.log").read_text().splitlines()
                 if "valid on 'dev_st' subset" in line]
        fields = [dict(part.split(" ", 1) for part in line[5:]) for line in lines]
        (run,) = report["arms"][attn_type]
        assert run["curve"] == [[int(f["num_updates"]), float(f["loss"]), float(f["nll_loss"])]
                                for f in fields] and run["curve"]
        encoder = Path(run["encoder_from"])
        assert encoder.name == "checkpoint_last.pt"
        assert encoder.parent.name.startswith(f"asr_{attn_type}_")
        nll[attn_type] = dict((step, value) for step, _, value in run["curve"])[2]
    table = out.with_suffix(".md").read_text()
    assert f"| leap | 1 | {nll['leap']:.3f} | {nll['leap'] - nll['softmax']:+.3f} |" in table
    assert f"| softmax | 1 | {nll['softmax']:.3f} | +0.000 |" in table


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_a_ctc_trained_asr_checkpoint_reloads_whole_with_its_ctc_layer(device_run, attn_type):
    work, _ = device_run
    (folder,) = (work / "data" / "runs").glob(f"asr_{attn_type}_*")
    checkpoint = folder / "checkpoint_last.pt"
    model, _ = load_streaming_model(str(checkpoint), str(work / "data"),
                                    overrides={"config_yaml": "config_asr.yaml"})
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    assert "ctc_projection.weight" in saved
    weights = model.state_dict()
    assert weights.keys() == saved.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0)
