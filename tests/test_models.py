"""Registered architectures: options, every attention combination trains, fairseq CLI."""
import argparse
import itertools
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

import leapformer_fairseq  # noqa: F401  (registers the models)
from leapformer_fairseq.models import resolve_attention_types
from leapformer_fairseq.modules import ATTN_TYPES, LeaPMultiheadAttention

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SLICE = ROOT / "data" / "gettext-mt" / "en-de.train.tsv"


def build(arch, **options):
    dictionary = Dictionary()
    for i in range(30):
        dictionary.add_symbol(f"w{i}")
    args = argparse.Namespace(arch=arch, dropout=0.0, max_source_positions=256,
                              max_target_positions=256, **options)
    ARCH_CONFIG_REGISTRY[arch](args)
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    return ARCH_MODEL_REGISTRY[arch].build_model(args, task), dictionary


def test_named_architectures_are_registered():
    for model in ("leapformer_transformer", "leapformer_waitk_transformer"):
        for suffix in ("", "_tiny", "_small", "_base"):
            assert model + suffix in ARCH_MODEL_REGISTRY
    base, _ = build("leapformer_transformer_base")
    assert base.encoder.layers[0].self_attn.embed_dim == 512
    assert len(base.encoder.layers) == 6 and len(base.decoder.layers) == 6
    assert base.encoder.layers[0].self_attn.num_heads == 8


@pytest.mark.parametrize("encoder,decoder,cross", itertools.product(ATTN_TYPES, repeat=3))
def test_every_attention_combination_trains(encoder, decoder, cross):
    model, dictionary = build("leapformer_waitk_transformer_tiny", waitk_lagging=2,
                              encoder_attn_type=encoder, decoder_attn_type=decoder,
                              cross_attn_type=cross)
    blocks = {"encoder": model.encoder.layers[0].self_attn,
              "decoder": model.decoder.layers[0].self_attn,
              "cross": model.decoder.layers[0].encoder_attn}
    assert {k: m.attn_type for k, m in blocks.items()} == dict(
        encoder=encoder, decoder=decoder, cross=cross)
    assert blocks["encoder"].causal and blocks["decoder"].causal
    assert blocks["cross"].waitk_lagging == 2
    model.train()
    source = torch.randint(dictionary.nspecial, len(dictionary), (3, 7))
    target = torch.randint(dictionary.nspecial, len(dictionary), (3, 5))
    logits, _ = model(source, torch.tensor([7, 7, 7]), target)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                             target.reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("feature_map", [None, "relu", "hedgehog"])
def test_leap_feature_map_reaches_the_leap_blocks(feature_map):
    """``--leap-feature-map``: LeaP blocks re-weight Hedgehog's features (and own its maps) with
    ``hedgehog``; unset (a checkpoint saved before the option) means ``relu``. Blocks of other
    types ignore it."""
    options = {} if feature_map is None else {"leap_feature_map": feature_map}
    model, _ = build("leapformer_waitk_transformer_tiny", waitk_lagging=2,
                     cross_attn_type="softmax", **options)
    blocks = [model.encoder.layers[0].self_attn, model.decoder.layers[0].self_attn]
    assert [block.leap_feature_map for block in blocks] == [feature_map or "relu"] * 2
    assert all(hasattr(block, "hedgehog_q") == (feature_map == "hedgehog") for block in blocks)
    assert not hasattr(model.decoder.layers[0].encoder_attn, "hedgehog_q")


@pytest.mark.parametrize("model", ["leapformer_waitk_transformer", "leapformer_s2t_waitk"])
def test_training_defaults_to_hedgehog_features_and_saved_args_without_them_keep_relu(model):
    """fairseq-train parses ``--leap-feature-map hedgehog`` unless told otherwise; args saved
    without the option, or with it unset (before hedgehog became the default), mean relu."""
    parser = argparse.ArgumentParser()
    ARCH_MODEL_REGISTRY[model].add_args(parser)
    trained_now = parser.parse_args([])
    resolve_attention_types(trained_now)
    assert trained_now.leap_feature_map == "hedgehog"
    assert parser.parse_args(["--leap-feature-map", "relu"]).leap_feature_map == "relu"
    for saved in (argparse.Namespace(), argparse.Namespace(leap_feature_map=None)):
        resolve_attention_types(saved)
        assert saved.leap_feature_map == "relu"


def test_reference_flags_select_leap_per_block():
    args = argparse.Namespace(enc_leapformer_enable=True, dec_sa_leapformer_enable=False,
                              dec_ca_leapformer_enable=True)
    resolve_attention_types(args)
    assert (args.encoder_attn_type, args.decoder_attn_type, args.cross_attn_type) == (
        "leap", "softmax", "leap")
    resolve_attention_types(args)  # loading a checkpoint resolves again: still fine
    args.decoder_attn_type = "leap"
    with pytest.raises(ValueError, match="--decoder-attn-type leap contradicts"):
        resolve_attention_types(args)
    defaults = argparse.Namespace()
    resolve_attention_types(defaults)
    assert (defaults.encoder_attn_type, defaults.leap_factor, defaults.leap_eps) == (
        "leap", 4, 0.1)


def test_offline_model_has_bidirectional_encoder_and_full_cross_attention():
    model, _ = build("leapformer_transformer_tiny")
    attention = model.encoder.layers[0].self_attn
    assert isinstance(attention, LeaPMultiheadAttention) and not attention.causal
    assert model.decoder.layers[0].encoder_attn.waitk_lagging is None


def test_waitk_training_mask_is_the_streaming_schedule():
    """Target token i is unaffected by source tokens from i + k on (wait-k), and the
    encoder is causal: changing source token j changes no encoder state before j."""
    model, dictionary = build("leapformer_waitk_transformer_tiny", waitk_lagging=3)
    model.eval()
    source = torch.randint(dictionary.nspecial, len(dictionary), (1, 9))
    target = torch.randint(dictionary.nspecial, len(dictionary), (1, 6))
    changed = source.clone()
    changed[0, 5] = (changed[0, 5] - dictionary.nspecial + 1) % (
        len(dictionary) - dictionary.nspecial) + dictionary.nspecial
    with torch.no_grad():
        before, _ = model(source, torch.tensor([9]), target)
        after, _ = model(changed, torch.tensor([9]), target)
        encoder_before = model.encoder(source, torch.tensor([9]))["encoder_out"][0]
        encoder_after = model.encoder(changed, torch.tensor([9]))["encoder_out"][0]
    # token 5 is first visible to target position 5 - 3 + 1 = 3
    torch.testing.assert_close(before[0, :3], after[0, :3])
    assert not torch.allclose(before[0, 3], after[0, 3])
    torch.testing.assert_close(encoder_before[:5], encoder_after[:5])


def test_missing_waitk_lagging_is_a_clear_error():
    with pytest.raises(ValueError, match="--waitk-lagging"):
        build("leapformer_waitk_transformer_tiny")


def write_corpus(work, rows):
    for split, part in (("train", rows[:150]), ("valid", rows[150:])):
        (work / f"{split}.en").write_text("".join(r[1] + "\n" for r in part), encoding="utf-8")
        (work / f"{split}.de").write_text("".join(r[2] + "\n" for r in part), encoding="utf-8")


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    rows = [line.rstrip("\n").split("\t") for line in SLICE.open(encoding="utf-8")][1:181]
    write_corpus(work, rows)
    done = subprocess.run(
        [str(BIN / "fairseq-preprocess"), "--source-lang", "en", "--target-lang", "de",
         "--trainpref", "train", "--validpref", "valid", "--destdir", "bin", "--workers", "1",
         "--joined-dictionary"], cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return work


@pytest.mark.parametrize("arch_options", [
    ["--arch", "leapformer_transformer_tiny", "--enc-leapformer-enable",
     "--dec-ca-leapformer-enable"],
    ["--arch", "leapformer_waitk_transformer_tiny", "--waitk-lagging", "2",
     "--encoder-attn-type", "leap", "--decoder-attn-type", "cosformer",
     "--cross-attn-type", "softmax", "--leap-factor", "2", "--leap-eps", "0.05"],
])
def test_fairseq_train_command_line(data_bin, arch_options, tmp_path):
    done = subprocess.run(
        [str(BIN / "fairseq-train"), str(data_bin / "bin"), "--user-dir", str(ROOT /
         "leapformer_fairseq"), *arch_options, "--optimizer", "adam", "--lr", "1e-3",
         "--max-tokens", "1000", "--max-update", "4", "--save-dir", str(tmp_path),
         "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--log-format", "simple",
         "--log-interval", "1"], capture_output=True, text=True, env=dict(os.environ))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    state = torch.load(tmp_path / "checkpoint_last.pt", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 4
    names = set(state["model"])
    if "--waitk-lagging" in arch_options:
        assert "decoder.layers.0.self_attn.leap_q.0.weight" not in names  # cosformer
        assert "encoder.layers.0.self_attn.leap_q.0.weight" in names
        assert state["cfg"]["model"].leap_factor == 2
    else:
        assert "encoder.layers.0.self_attn.leap_q.0.weight" in names
        assert "decoder.layers.0.encoder_attn.leap_k.0.weight" in names
        assert "decoder.layers.0.self_attn.leap_q.0.weight" not in names  # softmax


def train_cli(data_bin, save_dir, *arch_options, updates=30):
    done = subprocess.run(
        [str(BIN / "fairseq-train"), str(data_bin / "bin"), "--user-dir",
         str(ROOT / "leapformer_fairseq"), *arch_options, "--optimizer", "adam", "--lr", "3e-3",
         "--max-tokens", "1000", "--max-update", str(updates), "--save-dir", str(save_dir),
         "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--log-format", "simple"],
        capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return save_dir / "checkpoint_last.pt"


def generate_cli(data_bin, checkpoint):
    done = subprocess.run(
        [str(BIN / "fairseq-generate"), str(data_bin / "bin"), "--user-dir",
         str(ROOT / "leapformer_fairseq"), "--path", str(checkpoint), "--gen-subset", "valid",
         "--beam", "4", "--batch-size", "8", "--required-batch-size-multiple", "1",
         "--max-len-b", "20", "--cpu"],
        capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    hypotheses = {}
    for line in done.stdout.splitlines():
        if line.startswith("H-"):
            index, _, text = line.split("\t")
            hypotheses[int(index[2:])] = text
    return hypotheses


def test_generate_beam4_same_with_and_without_incremental_decoding(data_bin, tmp_path):
    from fairseq import checkpoint_utils, utils
    from fairseq.sequence_generator import SequenceGenerator

    checkpoint = train_cli(data_bin, tmp_path, "--arch", "leapformer_transformer_tiny")
    incremental = generate_cli(data_bin, checkpoint)
    assert len(incremental) == 30

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data_bin / "bin")})
    task.load_dataset("valid")
    generator = SequenceGenerator([m.eval() for m in models], task.target_dictionary,
                                  beam_size=4, max_len_b=20)
    generator.model.has_incremental = False  # every step re-runs the decoder on the prefix
    iterator = task.get_batch_iterator(task.dataset("valid"), max_sentences=8,
                                       required_batch_size_multiple=1).next_epoch_itr(
        shuffle=False)
    full_recompute = {}
    for sample in iterator:
        hypos = task.inference_step(generator, models, sample)
        for index, hypo in zip(sample["id"].tolist(), hypos):
            full_recompute[index] = task.target_dictionary.string(
                utils.strip_pad(hypo[0]["tokens"], task.target_dictionary.pad()))
    assert full_recompute == incremental
    assert len(set(incremental.values())) > 1


@pytest.mark.parametrize("attn_type", ["leap", "softmax"])
def test_generate_runs_on_the_waitk_arch(data_bin, tmp_path, attn_type):
    checkpoint = train_cli(data_bin, tmp_path, "--arch", "leapformer_waitk_transformer_tiny",
                           "--waitk-lagging", "2", "--encoder-attn-type", attn_type,
                           "--decoder-attn-type", attn_type, "--cross-attn-type", attn_type,
                           updates=5)
    assert len(generate_cli(data_bin, checkpoint)) == 30
