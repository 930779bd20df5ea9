"""fairseq checkpoints load under torch >= 2.6 once the plugin is imported (no env variable)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "leapformer_fairseq"
BIN = Path(sys.executable).parent
SLICE = ROOT / "data" / "gettext-mt" / "en-de.train.tsv"

LOAD = """
import sys
{import_plugin}
from fairseq import checkpoint_utils
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([sys.argv[1]])
print("loaded", type(models[0]).__name__, cfg.model.arch if cfg.model else None)
"""


def run(command, cwd):
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A tiny fairseq transformer trained for 3 updates with ``fairseq-train --user-dir``."""
    work = tmp_path_factory.mktemp("ckpt")
    rows = [line.rstrip("\n").split("\t") for line in SLICE.open(encoding="utf-8")][1:121]
    for split, part in (("train", rows[:100]), ("valid", rows[100:])):
        (work / f"{split}.en").write_text("".join(r[1] + "\n" for r in part), encoding="utf-8")
        (work / f"{split}.de").write_text("".join(r[2] + "\n" for r in part), encoding="utf-8")
    done = run([str(BIN / "fairseq-preprocess"), "--source-lang", "en", "--target-lang", "de",
                "--trainpref", "train", "--validpref", "valid", "--destdir", "bin",
                "--workers", "1"], work)
    assert done.returncode == 0, done.stderr[-2000:]
    done = run([str(BIN / "fairseq-train"), "bin", "--user-dir", str(PLUGIN),
                "--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1",
                "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
                "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
                "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
                "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "2000",
                "--max-update", "3", "--save-dir", "checkpoints", "--no-epoch-checkpoints",
                "--cpu", "--num-workers", "0", "--seed", "1", "--log-format", "simple"], work)
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = work / "checkpoints" / "checkpoint_last.pt"
    assert checkpoint.exists()
    return work, checkpoint


def test_checkpoint_needs_the_plugin_under_this_torch(trained_checkpoint):
    """Without the plugin, torch's weights_only default refuses fairseq's checkpoint."""
    work, checkpoint = trained_checkpoint
    done = run([sys.executable, "-c", LOAD.format(import_plugin=""), str(checkpoint)], work)
    assert done.returncode != 0
    assert "weights_only" in done.stderr


def test_checkpoint_loads_after_importing_the_plugin(trained_checkpoint):
    work, checkpoint = trained_checkpoint
    load = LOAD.format(import_plugin="import leapformer_fairseq")
    done = run([sys.executable, "-c", load, str(checkpoint)], work)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded TransformerModel transformer" in done.stdout


def test_training_resumes_and_generate_runs_with_user_dir(trained_checkpoint):
    work, checkpoint = trained_checkpoint
    resume = run([str(BIN / "fairseq-train"), "bin", "--user-dir", str(PLUGIN),
                  "--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1",
                  "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
                  "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
                  "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
                  "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "2000",
                  "--max-update", "4", "--save-dir", "resumed", "--restore-file", str(checkpoint),
                  "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--seed", "1",
                  "--log-format", "simple"], work)
    assert resume.returncode == 0, resume.stderr[-2000:]
    assert "Loaded checkpoint" in resume.stdout + resume.stderr
    done = run([str(BIN / "fairseq-generate"), "bin", "--user-dir", str(PLUGIN), "--path",
                str(checkpoint), "--gen-subset", "valid", "--beam", "2", "--max-len-b", "5",
                "--batch-size", "8", "--cpu"], work)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "BLEU" in done.stdout + done.stderr
