"""scripts/device_speed.sh, the GPU machine's speed measurements, as a CPU smoke run at tiny size
(its documented smoke command, without the backends' tests, which the suite runs anyway): the
attention benchmark in bf16 and the training throughput of softmax, LeaP and LeaP with its
feature map compiled, packed as results
folders; and the arithmetic of benchmarks/train_speed.py on known log lines."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import attention  # noqa: E402
import train_speed  # noqa: E402

METHODS = ("fairseq_softmax", "sdpa", "leap")
LENGTHS = (64, 128)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "DEVICE": "cpu", "PARTS": "attention,train",
           "LENGTHS": ",".join(map(str, LENGTHS)), "HEAD_DIMS": "8",
           "METHODS": ",".join(METHODS),
           "ATTENTION_ARGS": "--decode-positions 1,16 --decode-rounds 1 --decode-steps 10 "
                             "--cutover-lengths 16,32 --cutover-rounds 1 --repeats 1",
           "MAX_TRAIN": "400", "WINDOW": "4,8", "LOG_INTERVAL": "4",
           "TRAIN_SETS": "arch=leapformer_waitk_transformer_tiny max-tokens=512",
           "WORK": str(root / "work"), "OUT": str(root / "out")}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "device_speed.sh")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    unpacked = root / "unpacked"
    with tarfile.open(root / "out" / "device_speed.tgz") as archive:
        archive.extractall(unpacked, filter="data")
    return unpacked


def test_it_packs_both_results_folders(results):
    files = sorted(str(path.relative_to(results)) for path in results.rglob("*") if path.is_file())
    assert files == sorted(
        [f"attention_cpu_bfloat16_d8/attention_cpu.{ext}" for ext in ("json", "md", "png")]
        + [f"train_speed_gettext_en_de/train_speed_cpu.{ext}" for ext in ("json", "md", "png")])


def test_attention_is_causal_bf16_at_the_asked_sizes(results):
    report = json.loads((results / "attention_cpu_bfloat16_d8" / "attention_cpu.json").read_text())
    assert report["config"]["dtype"] == "bfloat16"
    assert report["config"]["attention"] == ["causal"]
    assert (report["config"]["embed_dim"], report["config"]["heads"]) == (64, 8)
    rows = {(row["method"], row["length"]): row for row in report["train"]}
    assert set(rows) == {(m, n) for m in METHODS for n in LENGTHS}
    assert all(row["causal"] and row["time_s"] > 0 and "error" not in row
               for row in rows.values())
    for n in LENGTHS:  # the summary's ratios are those of the rows
        by_length = report["summary"]["causal"]["by_length"][str(n)]
        assert by_length["leap_speedup_vs_sdpa"] == pytest.approx(
            rows["sdpa", n]["time_s"] / rows["leap", n]["time_s"])
    assert "bidirectional" not in report["summary"]
    # each LeaP decode row names the step that ran: bf16 steps are eager (the fused op serves
    # float32/float64), as leap_eager's always are
    backends = {(row["method"], row["step_backend"]) for row in report["decode"]
                if row["method"] != "fairseq_softmax"}
    assert backends == {("leap", "torch"), ("leap_hedgehog", "torch"), ("leap_eager", "torch")}


def test_training_speed_is_measured_over_the_window_of_each_run(results):
    report = json.loads(
        (results / "train_speed_gettext_en_de" / "train_speed_cpu.json").read_text())
    runs = {run["attn_type"]: run for run in report["runs"]}
    assert list(runs) == ["softmax", "leap", "leap+compiled"] and report["window"] == [4, 8]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
    assert report["commit"] in (head, head + "-dirty") and head
    for run in runs.values():
        assert (run["precision"], run["max_tokens"], run["updates"]) == ("fp32", 512, 4)
        assert run["updates_per_s"] * run["seconds"] == pytest.approx(4)
        assert run["tokens_per_s"] * run["seconds"] == pytest.approx(run["target_tokens"])
        assert abs(run["wall_s"] - run["seconds"]) <= 2  # fairseq's wall: whole seconds
    # the same batches whatever the attention: only the time differs
    assert runs["leap"]["target_tokens"] == runs["softmax"]["target_tokens"] > 0
    assert runs["leap+compiled"]["target_tokens"] == runs["leap"]["target_tokens"]
    # the variant reached fairseq-train: its run's resolved options carry the flag
    config = Path(runs["leap+compiled"]["log"]).with_name("config.yaml").read_text()
    assert "compile-feature-map: true" in config
    assert report["summary"]["leap"]["speed_vs_softmax"] == pytest.approx(
        runs["leap"]["updates_per_s"] / runs["softmax"]["updates_per_s"])


def test_rounds_alternate_and_are_summarised_per_type():
    assert train_speed.run_order(["softmax", "leap"], 3) == [
        (0, "softmax"), (0, "leap"), (1, "leap"), (1, "softmax"), (2, "softmax"), (2, "leap")]
    runs = [{"attn_type": "softmax", "updates_per_s": 2.0, "tokens_per_s": 100.0},
            {"attn_type": "leap", "updates_per_s": 1.0, "tokens_per_s": 50.0},
            {"attn_type": "leap", "updates_per_s": 2.0, "tokens_per_s": 70.0},
            {"attn_type": "softmax", "updates_per_s": 4.0, "tokens_per_s": 300.0}]
    summary = train_speed.summarise(runs)
    assert summary["leap"] == {"runs": 2, "updates_per_s": 1.5, "updates_per_s_sd": 0.5 ** 0.5,
                               "tokens_per_s": 60.0, "tokens_per_s_sd": 200 ** 0.5,
                               "speed_vs_softmax": 0.5}
    assert summary["softmax"]["speed_vs_softmax"] == 1.0


def test_window_throughput_sums_the_logged_intervals():
    rows = [{"num_updates": 4, "wps": 800.0, "wpb": 99.0, "wall": 1.0},
            {"num_updates": 8, "wps": 80.0, "wpb": 20.0, "wall": 2.0},
            {"num_updates": 12, "wps": 30.0, "wpb": 30.0, "wall": 6.0}]
    result = train_speed.window_throughput(rows, 4, 12)
    assert result["seconds"] == 5.0 and result["target_tokens"] == 200.0
    assert (result["updates_per_s"], result["tokens_per_s"], result["wall_s"]) == (1.6, 40.0, 5.0)
    with pytest.raises(ValueError, match="no train_inner line at update 10"):
        train_speed.window_throughput(rows, 4, 10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
def test_a_kernel_method_is_refused_off_cuda(capsys):
    with pytest.raises(SystemExit):
        attention.parse_args(["--methods", "leap,leap_fla"])
    assert "--methods leap_fla: LEAPFORMER_ATTENTION_BACKEND=fla runs on CUDA tensors only" \
        in capsys.readouterr().err


def test_an_unknown_training_variant_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_speed.parse_args(["--data", str(tmp_path), "--attn-types", "softmax,leap+fast"])
    assert "--attn-types leap+fast: unknown variant 'fast'; choose from compiled" \
        in capsys.readouterr().err
