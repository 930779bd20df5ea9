"""An ST model's decoder initialised from a text-to-text wait-k model's
(``--load-pretrained-decoder-from``): the real ``fairseq-train`` checkpoint of a tiny T2T model
whose decoder has the tiny S2T decoder's sizes, loaded into the S2T model and refused where it
cannot fit; and the documented recipe lines (docs/recipes.md) run at tiny size."""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY
from test_speech_data import build_speech_corpus

import leapformer_fairseq  # noqa: F401  (registers the models)
from leapformer_fairseq.models import LeaPformerS2TWaitkModel

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SLICE = ROOT / "data" / "gettext-mt" / "en-de.train.tsv"
# the tiny S2T decoder's sizes (leapformer_s2t_waitk_tiny), given to the T2T model
TINY_DECODER = {"encoder-embed-dim": 64, "decoder-embed-dim": 64, "decoder-ffn-embed-dim": 128,
                "decoder-layers": 1, "decoder-attention-heads": 2}
DECODER = [*(f"--{key}={value}" for key, value in TINY_DECODER.items()),
           "--decoder-normalize-before"]


@pytest.fixture(scope="module")
def t2t_checkpoint(tmp_path_factory):
    """``fairseq-train`` of a tiny LeaP wait-k T2T model, 2 updates; its data folder holds the
    target dictionary ``bin/dict.de.txt``."""
    work = tmp_path_factory.mktemp("t2t")
    rows = [line.rstrip("\n").split("\t") for line in SLICE.open(encoding="utf-8")][1:81]
    for split, part in (("train", rows[:60]), ("valid", rows[60:])):
        (work / f"{split}.en").write_text("".join(r[1] + "\n" for r in part), encoding="utf-8")
        (work / f"{split}.de").write_text("".join(r[2] + "\n" for r in part), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in (
        [BIN / "fairseq-preprocess", "--source-lang", "en", "--target-lang", "de",
         "--trainpref", "train", "--validpref", "valid", "--destdir", "bin", "--workers", "1"],
        [BIN / "fairseq-train", work / "bin", "--user-dir", ROOT / "leapformer_fairseq",
         "--arch", "leapformer_waitk_transformer_tiny", "--waitk-lagging", "2",
         "--encoder-attn-type", "leap", "--decoder-attn-type", "leap",
         "--cross-attn-type", "leap", *DECODER, "--optimizer", "adam", "--lr", "1e-3",
         "--max-tokens", "2000", "--max-update", "2", "--save-dir", "checkpoints",
         "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--seed", "1",
         "--log-format", "simple"],
    ):
        done = subprocess.run([str(part) for part in command], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return work / "checkpoints" / "checkpoint_last.pt", Dictionary.load(
        str(work / "bin" / "dict.de.txt"))


def build_st(dictionary: Dictionary, **options):
    """The tiny S2T wait-k model, LeaP everywhere, seed 0, on ``dictionary``."""
    torch.manual_seed(0)
    args = argparse.Namespace(
        arch="leapformer_s2t_waitk_tiny", waitk_lagging=2, frames_per_unit=3,
        encoder_attn_type="leap", decoder_attn_type="leap", cross_attn_type="leap",
        leap_feature_map="hedgehog", input_feat_per_channel=80, input_channels=1,
        max_source_positions=6000, max_target_positions=1024, **options)
    ARCH_CONFIG_REGISTRY[args.arch](args)
    model = LeaPformerS2TWaitkModel.build_model(
        args, SimpleNamespace(target_dictionary=dictionary))
    return model, args


def test_the_decoder_is_the_t2t_models_and_the_option_is_consumed(t2t_checkpoint):
    checkpoint, dictionary = t2t_checkpoint
    model, args = build_st(dictionary, load_pretrained_decoder_from=str(checkpoint))
    fresh, _ = build_st(dictionary)
    t2t = torch.load(checkpoint, weights_only=False)["model"]
    decoder = model.decoder.state_dict()
    assert decoder.keys() == {key.removeprefix("decoder.") for key in t2t
                              if key.startswith("decoder.")}
    for key, value in decoder.items():
        torch.testing.assert_close(value, t2t["decoder." + key], rtol=0, atol=0)
    changed = [key for key, value in fresh.decoder.state_dict().items()
               if value.is_floating_point() and not torch.equal(value, decoder[key])]
    assert "layers.0.encoder_attn.k_proj.weight" in changed  # it did load something
    for key, value in fresh.encoder.state_dict().items():  # the encoder is left alone
        torch.testing.assert_close(model.encoder.state_dict()[key], value, rtol=0, atol=0)
    assert args.load_pretrained_decoder_from is None
    assert args.decoder_initialized_from == str(checkpoint)


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match="--load-pretrained-decoder-from .*t2t.pt: no such checkpoint"):
        build_st(Dictionary(), load_pretrained_decoder_from=str(tmp_path / "t2t.pt"))


def test_other_decoder_layers_are_refused(t2t_checkpoint):
    checkpoint, dictionary = t2t_checkpoint
    with pytest.raises(ValueError, match="other parameters than this model's .*not here: "
                                         "layer_norm.bias, layer_norm.weight"):
        build_st(dictionary, load_pretrained_decoder_from=str(checkpoint),
                 decoder_normalize_before=False)


def test_another_dictionary_size_is_refused(t2t_checkpoint):
    checkpoint, dictionary = t2t_checkpoint
    bigger = Dictionary.load(str(checkpoint.parents[1] / "bin" / "dict.de.txt"))
    bigger.add_symbol("an-extra-word")
    with pytest.raises(ValueError, match=rf"decoder.embed_tokens.weight is \({len(dictionary)}, "
                                         rf"64\) there, \({len(bigger)}, 64\) here"):
        build_st(bigger, load_pretrained_decoder_from=str(checkpoint))


def test_another_dictionary_of_the_same_size_is_refused(t2t_checkpoint):
    checkpoint, dictionary = t2t_checkpoint
    renamed = Dictionary.load(str(checkpoint.parents[1] / "bin" / "dict.de.txt"))
    renamed.symbols[-1] = "a-different-word"
    with pytest.raises(ValueError, match="dict.de.txt differs from this model's; prepare the "
                                         "speech data with --st-vocab-from"):
        build_st(renamed, load_pretrained_decoder_from=str(checkpoint))


def test_a_checkpoint_whose_data_is_gone_is_refused(t2t_checkpoint, tmp_path):
    """The target dictionary cannot be checked without the checkpoint's task data."""
    checkpoint, dictionary = t2t_checkpoint
    state = torch.load(checkpoint, weights_only=False)
    state["cfg"]["task"]["data"] = str(tmp_path / "moved")
    torch.save(state, tmp_path / "t2t.pt")
    with pytest.raises(FileNotFoundError, match="its task data .*moved .*is not there"):
        build_st(dictionary, load_pretrained_decoder_from=str(tmp_path / "t2t.pt"))


def documented_commands():
    """The command lines of the bash block under "The ST decoder from a text model"."""
    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    section = text.split("### The ST decoder from a text model", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("python ")]


def test_the_documented_route_runs_at_tiny_size(tmp_path):
    """The documented lines, on the gettext-mt slice and a synthesised speech corpus, tiny
    models (the T2T decoder at the tiny S2T decoder's sizes) and 2 updates per training."""
    corpus = build_speech_corpus(tmp_path / "speech")
    t2t, s2t = tmp_path / "t2t-en-de", tmp_path / "s2t-en-de"
    tiny_t2t = ["--set", "arch=leapformer_waitk_transformer_tiny",
                *(f"--set={key}={value}" for key, value in TINY_DECODER.items())]
    extra = {"t2t_recipe.py prepare": ["--vocab-size", "300", "--max-train", "200",
                                       "--max-valid", "20", "--max-test", "20"],
             "t2t_recipe.py train": [*tiny_t2t, "--set", "max-update=2", "--cpu"],
             "s2t_recipe.py prepare": ["--vocab-size-asr", "60"],
             "s2t_recipe.py train-asr": ["--set", "arch=leapformer_s2t_waitk_tiny",
                                         "--set", "max-update=2", "--cpu"]}
    extra["s2t_recipe.py train-st"] = extra["s2t_recipe.py train-asr"]
    commands = documented_commands()
    assert [f"{Path(c[1]).name} {c[2]}" for c in commands] == list(extra)

    def run(command):
        step = f"{Path(command[1]).name} {command[2]}"
        command = [word.replace("data/gettext-mt-full/", "data/gettext-mt/")
                   .replace("work/t2t-en-de", str(t2t)).replace("work/s2t-en-de", str(s2t))
                   .replace("TTS_ROOT", str(corpus.mustc)) for word in command]
        done = subprocess.run([sys.executable, *command[1:], *extra[step]], cwd=ROOT,
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, (step, (done.stdout + done.stderr)[-3000:])

    for command in commands:
        run(command)
    assert (s2t / "spm_st.txt").read_bytes() == (t2t / "data-bin" / "dict.de.txt").read_bytes()
    st_checkpoint = s2t / "runs" / "st_leap_k5" / "checkpoint_last.pt"
    args = torch.load(st_checkpoint, weights_only=False)["cfg"]["model"]
    assert args.load_pretrained_decoder_from is None
    assert args.decoder_initialized_from == str(t2t / "runs" / "leap_k3" / "checkpoint_last.pt")
    assert args.encoder_initialized_from == \
        str(s2t / "runs" / "asr_leap_k5" / "checkpoint_last.pt")
    # train-st again, its decoder from a copy elsewhere, resumes the run: as for the encoder,
    # where the run started from may change (the checkpoint replaces it)
    shutil.copyfile(t2t / "runs" / "leap_k3" / "checkpoint_last.pt", t2t / "copy.pt")
    run([*commands[-1][:-1], "load-pretrained-decoder-from=work/t2t-en-de/copy.pt"])
    assert torch.load(st_checkpoint, weights_only=False)["cfg"]["model"] \
        .decoder_initialized_from == str(t2t / "copy.pt")
