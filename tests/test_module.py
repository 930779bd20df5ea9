"""``LeaPMultiheadAttention`` against a reference built from its own weights and the naive ops,
against fairseq's ``MultiheadAttention``, and incremental against parallel."""
import pytest
import torch
from fairseq.modules import MultiheadAttention

from leapformer_fairseq import ops
from leapformer_fairseq.modules import ATTN_TYPES, LINEAR_ATTN_TYPES, LeaPMultiheadAttention

EMBED, HEADS = 16, 2
TOL = dict(atol=1e-5, rtol=1e-5)


# the attention types, and LeaP re-weighting Hedgehog's features (``leap_feature_map``)
VARIANTS = (*ATTN_TYPES, "leap+hedgehog")
LINEAR_VARIANTS = (*LINEAR_ATTN_TYPES, "leap+hedgehog")


def make_module(variant, **kwargs):
    """A module of ``variant`` (an attention type, or ``leap+<feature map>``), in eval mode;
    Hedgehog's maps are moved away from their initial identity."""
    attn_type, _, feature_map = variant.partition("+")
    torch.manual_seed(1)
    module = LeaPMultiheadAttention(EMBED, HEADS, attn_type=attn_type,
                                    leap_feature_map=feature_map or "relu",
                                    cosformer_max_positions=128, **kwargs)
    if hasattr(module, "hedgehog_q"):
        with torch.no_grad():
            for layer in (module.hedgehog_q, module.hedgehog_k):
                layer.weight.add_(0.3 * torch.randn_like(layer.weight))
                layer.bias.normal_(std=0.3)
    return module.eval()


def split_heads(x):
    length, bsz, _ = x.shape
    return x.reshape(length, bsz * HEADS, EMBED // HEADS).transpose(0, 1)


def reference(module, query, key, key_padding_mask=None, allowed=None):
    """Straight from docs/math.md §1: per-head scores of the module's own projections. (T, B, C)."""
    bsz = query.size(1)
    q = split_heads(module.q_proj(query) * module.scaling)
    k = split_heads(module.k_proj(key))
    v = module.dropout_module(split_heads(module.v_proj(key)))
    padding = None if key_padding_mask is None else key_padding_mask.repeat_interleave(HEADS, 0)
    if allowed is not None and allowed.dim() == 3:
        allowed = allowed.repeat_interleave(HEADS, 0)
    if module.attn_type == "softmax":
        out = ops.naive_softmax_attention(q, k, v, allowed, padding)
    else:
        if hasattr(module, "hedgehog_q"):  # phi(u) = sqrt(2d) softmax([W u + b, -(W u + b)])
            q_t = hedgehog_features(module.hedgehog_q, q)
            k_t = hedgehog_features(module.hedgehog_k, k)
        else:
            q_t, k_t = torch.relu(q), torch.relu(k)
        p_q = p_k = None
        if module.attn_type == "leap":  # the MLPs read relu(u), whatever the features
            p_q = module.leap_q(torch.relu(q)).squeeze(-1)
            p_k = module.leap_k(torch.relu(k)).squeeze(-1)
        elif module.attn_type == "cosformer":  # right padding only: positions are 0, 1, 2, ...
            p_q = torch.arange(q.size(1), dtype=q.dtype).expand(q.size(0), -1) \
                / module.cosformer_max_positions
            p_k = torch.arange(k.size(1), dtype=k.dtype).expand(k.size(0), -1) \
                / module.cosformer_max_positions
        out = ops.naive_leap_attention(q_t, k_t, v, p_q, p_k, allowed, padding)
    return module.out_proj(out.transpose(0, 1).reshape(query.size(0), bsz, EMBED))


def hedgehog_features(layer, x):
    """Hedgehog's feature map written out: exp of +-(W x + b), normalised, times sqrt(2d)."""
    mapped = x @ layer.weight.T + layer.bias
    both = torch.exp(torch.cat([mapped, -mapped], dim=-1))
    return both / both.sum(-1, keepdim=True) * (2 * x.size(-1)) ** 0.5


def right_padding(bsz, length):
    padding = torch.zeros(bsz, length, dtype=torch.bool)
    padding[1, length - 3:] = True
    return padding


def assert_close_at(actual, expected, padding=None):
    """Compare ``(T, B, C)`` outputs at the non-padded query positions."""
    if padding is not None:
        keep = ~padding.T
        actual, expected = actual[keep], expected[keep]
    torch.testing.assert_close(actual, expected, **TOL)


@pytest.mark.parametrize("attn_type", VARIANTS)
def test_encoder_self_attention_matches_reference(attn_type):
    module = make_module(attn_type, self_attention=True)
    x = torch.randn(11, 3, EMBED)
    padding = right_padding(3, 11)
    out, _ = module(x, x, x, key_padding_mask=padding, need_weights=False)
    assert_close_at(out, reference(module, x, x, padding), padding)


@pytest.mark.parametrize("attn_type", VARIANTS)
@pytest.mark.parametrize("select_causal", ["flag", "future_mask"])
def test_causal_self_attention_matches_reference(attn_type, select_causal):
    length = 70
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    x = torch.randn(length, 2, EMBED)
    padding = right_padding(2, length)
    if select_causal == "flag":
        module = make_module(attn_type, self_attention=True, causal=True, chunk_size=16)
        out, _ = module(x, x, x, key_padding_mask=padding, need_weights=False)
    else:
        module = make_module(attn_type, self_attention=True, chunk_size=16)
        future_mask = torch.zeros(length, length).masked_fill(~causal, float("-inf"))
        out, _ = module(x, x, x, key_padding_mask=padding, attn_mask=future_mask,
                        need_weights=False)
    assert_close_at(out, reference(module, x, x, padding, causal), padding)


@pytest.mark.parametrize("attn_type", VARIANTS)
def test_cross_attention_matches_reference(attn_type):
    module = make_module(attn_type, encoder_decoder_attention=True)
    target, source = torch.randn(6, 3, EMBED), torch.randn(9, 3, EMBED)
    padding = right_padding(3, 9)
    out, _ = module(target, source, source, key_padding_mask=padding, static_kv=True)
    assert_close_at(out, reference(module, target, source, padding))


@pytest.mark.parametrize("attn_type", VARIANTS)
@pytest.mark.parametrize("per_sentence", [False, True])
def test_wait_k_cross_attention_matches_reference(attn_type, per_sentence):
    module = make_module(attn_type, encoder_decoder_attention=True)
    target, source = torch.randn(8, 2, EMBED), torch.randn(9, 2, EMBED)
    limit = (torch.arange(8) + 3).clamp_max(9)  # wait-3
    if per_sentence:
        limit = torch.stack([limit, (torch.arange(8) + 1).clamp_max(9)])
    allowed = torch.arange(9) < limit.unsqueeze(-1)
    out, _ = module(target, source, source, key_limit=limit)
    assert_close_at(out, reference(module, target, source, None, allowed))


@pytest.mark.parametrize("attn_type", VARIANTS)
def test_unit_causal_self_attention_matches_reference(attn_type):
    """Full attention inside units of 3 positions, causal across them: the module's own
    ``unit_causal`` and an explicit key limit, both against the reference."""
    x = torch.randn(10, 2, EMBED)
    limit = ((torch.arange(10) // 3 + 1) * 3).clamp_max(10)
    allowed = torch.arange(10) < limit.unsqueeze(-1)
    module = make_module(attn_type, self_attention=True)
    out, _ = module(x, x, x, key_limit=limit)
    assert_close_at(out, reference(module, x, x, None, allowed))
    unit_causal = make_module(attn_type, self_attention=True, causal=True, unit_causal=True,
                              frames_per_unit=3)
    out, _ = unit_causal(x, x, x)
    assert_close_at(out, reference(unit_causal, x, x, None, allowed))


@pytest.mark.parametrize("attn_type", LINEAR_VARIANTS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_causal_training_gradients_match_reference(attn_type, dropout):
    """The blockwise-recomputed causal form gives autograd's gradients, dropout included."""
    length = 45
    module = make_module(attn_type, self_attention=True, causal=True, dropout=dropout,
                         chunk_size=4, block_size=16).train()
    x = torch.randn(length, 2, EMBED, requires_grad=True)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    leaves = [x, *module.parameters()]
    cotangent = torch.randn(length, 2, EMBED)
    torch.manual_seed(7)
    ours = module(x, x, x, need_weights=False)[0]
    torch.manual_seed(7)
    expected = reference(module, x, x, None, causal)
    torch.testing.assert_close(ours, expected, **TOL)
    our_grads = torch.autograd.grad(ours, leaves, cotangent)
    expected_grads = torch.autograd.grad(expected, leaves, cotangent)
    for name, actual, wanted in zip(["x", *dict(module.named_parameters())], our_grads,
                                    expected_grads):
        torch.testing.assert_close(actual, wanted, atol=1e-4, rtol=1e-4, msg=name)


def copy_into_fairseq(module, **kwargs):
    fairseq_attention = MultiheadAttention(EMBED, HEADS, **kwargs).eval()
    fairseq_attention.load_state_dict(module.state_dict(), strict=True)
    return fairseq_attention


def test_softmax_is_fairseq_multihead_attention():
    module = make_module("softmax", encoder_decoder_attention=True)
    fairseq_attention = copy_into_fairseq(module, encoder_decoder_attention=True)
    target, source = torch.randn(5, 3, EMBED), torch.randn(7, 3, EMBED)
    padding = right_padding(3, 7)
    ours, our_weights = module(target, source, source, key_padding_mask=padding)
    theirs, their_weights = fairseq_attention(target, source, source, key_padding_mask=padding)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_weights, their_weights)
    limit = torch.tensor([1, 2, 4, 6, 7])
    blocked = torch.arange(7) >= limit[:, None]
    ours, _ = module(target, source, source, key_limit=limit)
    theirs, _ = fairseq_attention(
        target, source, source,
        attn_mask=torch.zeros(5, 7).masked_fill(blocked, float("-inf")),
    )
    torch.testing.assert_close(ours, theirs)


def test_softmax_causal_flag_is_fairseq_future_mask_and_cache():
    module = make_module("softmax", self_attention=True, causal=True)
    fairseq_attention = copy_into_fairseq(module, self_attention=True)
    x = torch.randn(9, 2, EMBED)
    future = torch.zeros(9, 9).masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1),
                                           float("-inf"))
    ours, _ = module(x, x, x, need_weights=False)
    theirs, _ = fairseq_attention(x, x, x, attn_mask=future, need_weights=False)
    torch.testing.assert_close(ours, theirs)
    state = {}
    steps = [module(x[i:i + 1], x[i:i + 1], x[i:i + 1], incremental_state=state)[0]
             for i in range(9)]
    torch.testing.assert_close(torch.cat(steps), theirs, **TOL)


def run_steps(module, x, state, block=1):
    """Feed ``x`` (T, B, C) through decoder self-attention ``block`` tokens at a time."""
    outs = []
    for start in range(0, x.size(0), block):
        piece = x[start:start + block]
        outs.append(module(piece, piece, piece, incremental_state=state, need_weights=False)[0])
    return torch.cat(outs)


@pytest.mark.parametrize("attn_type", VARIANTS)
def test_incremental_self_attention_equals_parallel(attn_type):
    module = make_module(attn_type, self_attention=True, causal=True, dropout=0.3,
                         chunk_size=8)
    x = torch.randn(40, 3, EMBED)
    parallel, _ = module(x, x, x, need_weights=False)
    torch.testing.assert_close(run_steps(module, x, {}), parallel, **TOL)
    if attn_type != "softmax":  # several new tokens per call: the chunked form with a state
        torch.testing.assert_close(run_steps(module, x, {}, block=7), parallel, **TOL)


@pytest.mark.parametrize("attn_type", LINEAR_VARIANTS)
def test_dropout_acts_in_training_only(attn_type):
    module = make_module(attn_type, self_attention=True, dropout=0.5).train()
    x = torch.randn(6, 2, EMBED)
    assert not torch.allclose(module(x, x, x)[0], module(x, x, x)[0])
    module.eval()
    torch.testing.assert_close(module(x, x, x)[0], module(x, x, x)[0])


@pytest.mark.parametrize("attn_type", LINEAR_VARIANTS)
def test_incremental_state_holds_no_key_value_cache(attn_type):
    module = make_module(attn_type, self_attention=True, causal=True)
    x = torch.randn(50, 2, EMBED)
    state = {}
    run_steps(module, x[:5], state)
    sizes_after_5 = {name: t.shape for name, t in module._get_input_buffer(state).items()}
    run_steps(module, x[5:], state)
    sizes_after_50 = {name: t.shape for name, t in module._get_input_buffer(state).items()}
    assert sizes_after_5 == sizes_after_50
    feature_dim = module.head_dim * {"linear": 1, "leap+hedgehog": 4}.get(attn_type, 2)
    assert sizes_after_50["kv_state"] == (2 * HEADS, feature_dim, module.head_dim)


@pytest.mark.parametrize("attn_type", VARIANTS)
def test_incremental_cross_attention_caches_source_once(attn_type):
    module = make_module(attn_type, encoder_decoder_attention=True)
    target, source = torch.randn(6, 3, EMBED), torch.randn(9, 3, EMBED)
    padding = right_padding(3, 9)
    parallel, _ = module(target, source, source, key_padding_mask=padding, static_kv=True)
    state = {}
    steps = [module(target[i:i + 1], source, source, key_padding_mask=padding,
                    incremental_state=state, static_kv=True)[0] for i in range(6)]
    torch.testing.assert_close(torch.cat(steps), parallel, **TOL)


@pytest.mark.parametrize("attn_type", LINEAR_VARIANTS)
def test_streamed_source_equals_wait_k_prefix(attn_type):
    """Appending source units (static_kv=False) before each target step is wait-k."""
    module = make_module(attn_type, encoder_decoder_attention=True)
    target, source = torch.randn(8, 2, EMBED), torch.randn(9, 2, EMBED)
    waitk = 2
    limit = (torch.arange(8) + waitk).clamp_max(9)
    parallel, _ = module(target, source, source, key_limit=limit)
    state, pushed, steps = {}, 0, []
    for i in range(8):
        new = source[pushed:limit[i]]
        pushed = int(limit[i])
        steps.append(module(target[i:i + 1], new if len(new) else None,
                            new if len(new) else None, incremental_state=state)[0])
    torch.testing.assert_close(torch.cat(steps), parallel, **TOL)


@pytest.mark.parametrize("attn_type", VARIANTS)
def test_beam_reorder_reorders_the_state(attn_type):
    module = make_module(attn_type, self_attention=True, causal=True)
    history, future = torch.randn(5, 3, EMBED), torch.randn(4, 3, EMBED)
    new_order = torch.tensor([2, 0, 0])
    state = {}
    run_steps(module, history, state)
    module.reorder_incremental_state(state, new_order)
    reordered = run_steps(module, future, state)
    fresh = run_steps(module, torch.cat([history[:, new_order], future]), {})[5:]
    torch.testing.assert_close(reordered, fresh, **TOL)


@pytest.mark.parametrize("attn_type", VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(attn_type, causal, side):
    module = make_module(attn_type, self_attention=True, causal=causal, chunk_size=4)
    x = torch.randn(7, 1, EMBED)
    alone, _ = module(x, x, x, need_weights=False)
    junk = torch.randn(5, 1, EMBED)
    padded = torch.cat([junk, x] if side == "left" else [x, junk])
    batch = torch.cat([padded, torch.randn(12, 1, EMBED)], dim=1)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[0, :5] = side == "left"
    padding[0, 7:] = side == "right"
    real = slice(5, 12) if side == "left" else slice(0, 7)
    for need_weights in (False, True):  # softmax: fused kernel, then explicit weights
        out, _ = module(batch, batch, batch, key_padding_mask=padding, need_weights=need_weights)
        torch.testing.assert_close(out[real, :1], alone, **TOL)
        # no all-masked softmax row: padded queries of a causal left-padded row give no NaN
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs", [dict(self_attention=True, causal=True),
                                    dict(encoder_decoder_attention=True, waitk_lagging=2)])
def test_leap_with_input_norm_matches_reference(kwargs):
    """``leap_input_norm``: the MLPs layer-normalise their input; the module still computes the
    formula with those proportions, causal self-attention and wait-k cross-attention alike."""
    module = make_module("leap", leap_input_norm=True, **kwargs)
    assert isinstance(module.leap_q[0], torch.nn.LayerNorm)
    with torch.no_grad():  # a non-trivial affine part
        module.leap_q[0].weight.normal_()
        module.leap_k[0].bias.normal_()
    x = torch.randn(9, 2, EMBED)
    source = torch.randn(11, 2, EMBED) if module.encoder_decoder_attention else x
    out, _ = module(x, source, source)
    if module.causal:
        allowed = torch.ones(9, 9, dtype=torch.bool).tril()
    else:
        allowed = torch.arange(11) < (torch.arange(9) + 2).unsqueeze(-1)
    assert_close_at(out, reference(module, x, source, None, allowed))


def test_leap_parameters_use_fairseq_names():
    names = set(dict(make_module("leap", self_attention=True).named_parameters()))
    for prefix in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert {f"{prefix}.weight", f"{prefix}.bias"} <= names
    assert {"leap_q.0.weight", "leap_q.2.weight", "leap_k.0.weight", "leap_k.2.bias"} <= names
    module = make_module("leap", self_attention=True, leap_factor=2)
    assert module.leap_q[0].out_features == (EMBED // HEADS) // 2
    assert not any(name.startswith("hedgehog") for name in names)
    names = set(dict(make_module("leap+hedgehog", self_attention=True).named_parameters()))
    assert {"leap_q.0.weight", "hedgehog_q.weight", "hedgehog_k.bias"} <= names


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="attn_type"):
        LeaPMultiheadAttention(EMBED, HEADS, attn_type="performer")
    with pytest.raises(ValueError, match="leap_feature_map must be one of"):
        LeaPMultiheadAttention(EMBED, HEADS, leap_feature_map="dpfp")
    module = make_module("leap", self_attention=True)
    x = torch.randn(4, 1, EMBED)
    with pytest.raises(ValueError, match="future mask"):
        module(x, x, x, attn_mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="key_limit"):
        module(x, x, x, incremental_state={}, key_limit=torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="causal"):
        LeaPMultiheadAttention(EMBED, HEADS, encoder_decoder_attention=True, causal=True)


def test_cosformer_positions_past_max_are_an_error():
    """cosFormer has positions ``0 .. M - 1`` (``p = i / M`` in ``[0, 1)``): offline and
    incremental calls past them raise an error naming the option, never a wrong value."""
    module = LeaPMultiheadAttention(EMBED, HEADS, attn_type="cosformer", self_attention=True,
                                    causal=True, cosformer_max_positions=8).eval()
    module(torch.randn(8, 1, EMBED), None, None)  # positions 0 .. 7: fine
    message = "cosFormer position 8 is past --cosformer-max-positions 8"
    with pytest.raises(ValueError, match=message):
        module(torch.randn(9, 1, EMBED), None, None)
    state = {}
    module(torch.randn(8, 1, EMBED), None, None, incremental_state=state)
    with pytest.raises(ValueError, match=message):
        module(torch.randn(1, 1, EMBED), None, None, incremental_state=state)
    cross = LeaPMultiheadAttention(EMBED, HEADS, attn_type="cosformer",
                                   encoder_decoder_attention=True, cosformer_max_positions=8)
    with pytest.raises(ValueError, match=message):
        cross.eval()(torch.randn(2, 1, EMBED), torch.randn(9, 1, EMBED), torch.randn(9, 1, EMBED))
