"""The attention diagnostic measures what each block computes.

The rebuilt scores and masks reproduce each block's output for every attention type and mask
(bidirectional, causal, unit-causal, wait-k with left padding); each statistic takes its known
value on blocks built to have it; the command runs on a checkpoint.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leapformer_fairseq.diagnostics import STATISTICS, attention_scores, diagnose, main
from leapformer_fairseq.modules import ATTN_TYPES, LeaPMultiheadAttention

ROOT = Path(__file__).resolve().parents[1]
PRE_RENAME = ROOT / "tests" / "fixtures" / "pre_rename" / "t2t"
EMBED, HEADS = 16, 2


def block(variant, **kwargs):
    """A block of ``variant`` (an attention type, or ``leap+<feature map>``), float64."""
    attn_type, _, feature_map = variant.partition("+")
    torch.manual_seed(3)
    return LeaPMultiheadAttention(EMBED, HEADS, attn_type=attn_type, cosformer_max_positions=16,
                                  leap_feature_map=feature_map or "relu",
                                  **kwargs).double().eval()


def output_from_scores(module, scores, value):
    """The block's output from the rebuilt weights: ``out_proj(weights @ v)``."""
    v = module._split_heads(module.v_proj(value)).double()
    out = scores.weights() @ v
    length, bsz = scores.base.size(1), value.size(1)
    return module.out_proj(out.transpose(0, 1).reshape(length, bsz, EMBED))


def left_padding(bsz, length):
    padding = torch.zeros(bsz, length, dtype=torch.bool)
    padding[1, :3] = True
    return padding


CALLS = {
    "bidirectional": (dict(self_attention=True), False),
    "causal": (dict(self_attention=True, causal=True), False),
    "future mask": (dict(self_attention=True), True),
    "unit-causal": (dict(self_attention=True, causal=True, unit_causal=True, frames_per_unit=3),
                    False),
    "wait-k cross": (dict(encoder_decoder_attention=True, waitk_lagging=2), False),
    "cross": (dict(encoder_decoder_attention=True), False),
}


@pytest.mark.parametrize("attn_type", (*ATTN_TYPES, "leap+hedgehog"))
@pytest.mark.parametrize("call", CALLS)
def test_rebuilt_scores_reproduce_the_block_output(attn_type, call):
    kwargs, future_mask = CALLS[call]
    module = block(attn_type, **kwargs)
    query = torch.randn(9, 2, EMBED, dtype=torch.float64)
    cross = module.encoder_decoder_attention
    key = torch.randn(11, 2, EMBED, dtype=torch.float64) if cross else query
    # left padding for self-attention (text batches) and for the wait-k source
    padding = left_padding(2, key.size(0)) if call != "unit-causal" else None
    attn_mask = torch.triu(torch.full((9, 9), float("-inf")), 1).double() if future_mask \
        else None
    expected, _ = module(query, key, key, key_padding_mask=padding, attn_mask=attn_mask,
                         need_weights=False)
    scores = attention_scores(module, query, None if not cross else key, padding, attn_mask)
    actual = output_from_scores(module, scores, key)
    real = ~padding.T if padding is not None and not cross else torch.ones(9, 2, dtype=bool)
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-9, atol=1e-9)


def run_diagnose(module, query, key=None, padding=None):
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = module

        def forward(self, query, key, padding):
            return self.attention(query=query, key=key, value=key, key_padding_mask=padding)

    key = query if key is None else key
    return diagnose(Wrapper(), [{"net_input": {"query": query, "key": key,
                                               "padding": padding}}])["attention"]


def test_a_constant_proportion_is_measured_as_no_reweighting():
    """LeaP MLPs that output one constant: no spread, factor 1 on every pair."""
    module = block("leap", self_attention=True)
    with torch.no_grad():
        for mlp in (module.leap_q, module.leap_k):
            mlp[2].weight.zero_()
            mlp[2].bias.fill_(0.3)
    row = run_diagnose(module, torch.randn(7, 2, EMBED, dtype=torch.float64))
    assert row["p_std_q"] == pytest.approx(0, abs=1e-7)
    assert row["p_std_k"] == pytest.approx(0, abs=1e-7)
    assert row["factor_mean"] == pytest.approx(1.0)
    assert row["factor_spread"] == pytest.approx(0, abs=1e-12)


def test_cosformer_factor_follows_positions():
    """cosFormer with M = 16 on 7 tokens: p = i / 16, so the factor of pair (i, j) is
    cos(pi/2 (i - j) / 16), averaged over all 49 pairs."""
    module = block("cosformer", self_attention=True)
    row = run_diagnose(module, torch.randn(7, 1, EMBED, dtype=torch.float64))
    i = torch.arange(7.0, dtype=torch.float64)
    factor = torch.cos(torch.pi / 2 * (i[:, None] - i[None, :]) / 16)
    assert row["factor_mean"] == pytest.approx(float(factor.mean()))
    assert row["factor_spread"] == pytest.approx(float(((1 - factor.amin(1)) / 1).mean()))
    assert row["p_std_q"] == pytest.approx(float(i.std(unbiased=False) / 16))


def test_uniform_attention_has_entropy_one_and_clamp_rate_follows_eps():
    """Keys that all project to the same positive features: every query weighs its keys
    equally (entropy 1). The clamp binds for every query once eps exceeds every score sum, and
    for none when eps is tiny."""
    rows = {}
    for eps in (1e-9, 1e9):
        module = block("linear", self_attention=True, eps=eps)
        with torch.no_grad():
            module.k_proj.weight.zero_()
            module.k_proj.bias.fill_(1.0)
            module.q_proj.bias.fill_(5.0)  # every query feature > 0: no zero score sums
        rows[eps] = run_diagnose(module, torch.randn(6, 2, EMBED, dtype=torch.float64) * 0.1)
    assert rows[1e-9]["entropy"] == pytest.approx(1.0)
    assert (rows[1e-9]["clamp_rate"], rows[1e9]["clamp_rate"]) == (0.0, 1.0)
    assert rows[1e-9]["p_std_q"] is None and rows[1e-9]["factor_mean"] is None


def test_dead_features_are_counted_per_head_dimension():
    """Query projections biased far below zero in 3 of the 16 (head, dimension) slots: those
    ReLU features are zero for every token, the others are not."""
    module = block("linear", self_attention=True)
    with torch.no_grad():
        module.q_proj.bias.fill_(0.0)
        module.q_proj.bias[[0, 5, 12]] = -1e6
        module.q_proj.bias[[i for i in range(16) if i not in (0, 5, 12)]] = 1e6
        module.k_proj.bias.fill_(1e6)
    row = run_diagnose(module, torch.randn(6, 2, EMBED, dtype=torch.float64))
    assert row["dead_q"] == pytest.approx(3 / 16)
    assert row["dead_k"] == 0.0


def test_softmax_entropy_is_measured_and_linear_statistics_are_absent():
    module = block("softmax", self_attention=True)
    row = run_diagnose(module, torch.randn(6, 2, EMBED, dtype=torch.float64))
    assert 0 < row["entropy"] <= 1
    assert all(row[name] is None for name in STATISTICS if name != "entropy")


def test_the_command_reports_every_block_of_a_checkpoint(tmp_path):
    """``python -m leapformer_fairseq.diagnostics`` on a tiny text wait-k checkpoint: one row
    per attention block (encoder self, decoder self, cross), each statistic in range."""
    pairs = (ROOT / "data" / "gettext-mt" / "en-de.train.tsv").read_text().splitlines()[71:81]
    for lang, column in (("en", 1), ("de", 2)):
        (tmp_path / f"valid.{lang}").write_text(
            "".join(line.split("\t")[column] + "\n" for line in pairs))
    subprocess.run([sys.executable, "-m", "fairseq_cli.preprocess", "-s", "en", "-t", "de",
                    "--validpref", tmp_path / "valid", "--destdir", tmp_path / "bin",
                    "--srcdict", PRE_RENAME / "dict.en.txt", "--tgtdict",
                    PRE_RENAME / "dict.de.txt", "--workers", "1"], check=True,
                   capture_output=True)
    main(["--checkpoint", str(PRE_RENAME / "checkpoint.pt"), "--data", str(tmp_path / "bin"),
          "--max-sentences", "8", "--json", str(tmp_path / "out.json")])
    results = json.loads((tmp_path / "out.json").read_text())
    assert set(results) == {"encoder.layers.0.self_attn", "decoder.layers.0.self_attn",
                            "decoder.layers.0.encoder_attn"}
    for row in results.values():
        assert row["attn_type"] == "leap"
        assert 0 < row["factor_mean"] <= 1 and 0 <= row["factor_spread"] <= 1
        assert 0 <= row["clamp_rate"] <= 1 and 0 < row["entropy"] <= 1
        assert 0 <= row["dead_q"] <= 1 and row["p_std_q"] >= 0
