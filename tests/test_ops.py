"""Each fast form of normalised linear attention against the naive reference (docs/math.md §1-3)."""
import pytest
import torch

from leapformer_fairseq import ops

LINEAR_TYPES = ("leap", "cosformer", "linear")
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
LENGTHS = (1, 2, 7, 63, 64, 65, 130, 300)
CHUNK_SIZES = (1, 3, 16, 64, 100)
COSFORMER_M = 512


def make_inputs(attn_type, n, lq, lk, dtype, d=8, dv=5):
    """Features ``q~, k~``, values, proportions (or None) and the 2d features ``phi``."""
    q_tilde = ops.relu_features(torch.randn(n, lq, d, dtype=dtype))
    k_tilde = ops.relu_features(torch.randn(n, lk, d, dtype=dtype))
    v = torch.randn(n, lk, dv, dtype=dtype)
    if attn_type == "linear":
        return q_tilde, k_tilde, v, None, None, q_tilde, k_tilde
    if attn_type == "leap":
        p_q = torch.rand(n, lq, dtype=dtype)
        p_k = torch.rand(n, lk, dtype=dtype)
    else:
        p_q = ops.cosformer_proportions(torch.arange(lq, dtype=dtype).expand(n, lq), COSFORMER_M)
        p_k = ops.cosformer_proportions(torch.arange(lk, dtype=dtype).expand(n, lk), COSFORMER_M)
    return (q_tilde, k_tilde, v, p_q, p_k,
            ops.sincos_features(q_tilde, p_q[..., None]),
            ops.sincos_features(k_tilde, p_k[..., None]))


def right_padding(n, length, generator_seed=1):
    """``(n, length)`` bool, True at padding; row 0 unpadded, others lose up to half."""
    generator = torch.Generator().manual_seed(generator_seed)
    lengths = torch.randint(max(1, length // 2), length + 1, (n,), generator=generator)
    lengths[0] = length
    return torch.arange(length)[None, :] >= lengths[:, None]


def assert_close(actual, expected):
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def test_sincos_features_reproduce_the_cos_reweighting():
    q_tilde, k_tilde = torch.rand(4, 6, dtype=torch.float64), torch.rand(5, 6, dtype=torch.float64)
    p_q, p_k = torch.rand(4, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    phi_scores = (ops.sincos_features(q_tilde, p_q[:, None])
                  @ ops.sincos_features(k_tilde, p_k[:, None]).T)
    direct = (q_tilde @ k_tilde.T) * torch.cos(torch.pi / 2 * (p_q[:, None] - p_k[None, :]))
    torch.testing.assert_close(phi_scores, direct, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_softmax_features_are_the_hedgehog_formula(dtype):
    """``sqrt(2d) * exp(+-x_m) / sum(exp(+-x))`` per row: in float64, and in half precision within
    a few units of rounding of the float64 result; positive, summing to sqrt(2d)."""
    x = torch.randn(3, 7, 8, dtype=torch.float64) * 3
    both = torch.exp(torch.cat([x, -x], dim=-1))
    expected = both / both.sum(-1, keepdim=True) * 4.0
    actual = ops.softmax_features(x.to(dtype))
    assert actual.dtype == dtype and actual.shape == (3, 7, 16)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(actual.double(), expected, rtol=4 * eps, atol=4 * eps)
    if dtype == torch.float64:  # half precision may round the smallest entries to 0
        assert bool((actual > 0).all())
    torch.testing.assert_close(actual.double().sum(-1), torch.full((3, 7), 4.0,
                                                                    dtype=torch.float64),
                               rtol=16 * eps, atol=16 * eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("attn_type", LINEAR_TYPES)
def test_bidirectional_matches_naive(attn_type, length, dtype):
    q_t, k_t, v, p_q, p_k, phi_q, phi_k = make_inputs(attn_type, 3, length, length, dtype)
    padding = right_padding(3, length)
    expected = ops.naive_leap_attention(q_t, k_t, v, p_q, p_k, None, padding, padding)
    actual = ops.bidirectional_linear_attention(phi_q, phi_k, v, padding, padding)
    assert_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", (1, 7, 65, 300))
@pytest.mark.parametrize("attn_type", LINEAR_TYPES)
def test_bidirectional_cross_attention_matches_naive(attn_type, length, dtype):
    q_t, k_t, v, p_q, p_k, phi_q, phi_k = make_inputs(attn_type, 3, length, 37, dtype)
    padding = right_padding(3, 37)
    expected = ops.naive_leap_attention(q_t, k_t, v, p_q, p_k, None, padding)
    assert_close(ops.bidirectional_linear_attention(phi_q, phi_k, v, padding), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("attn_type", LINEAR_TYPES)
def test_causal_chunked_matches_naive(attn_type, length, chunk_size, dtype):
    q_t, k_t, v, p_q, p_k, phi_q, phi_k = make_inputs(attn_type, 3, length, length, dtype)
    padding = right_padding(3, length)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    expected = ops.naive_leap_attention(q_t, k_t, v, p_q, p_k, causal, padding)
    actual, _ = ops.causal_linear_attention(phi_q, phi_k, v, chunk_size, padding)
    assert_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("split", (1, 50, 64, 199))
def test_causal_chunked_continues_from_initial_state(split, dtype):
    _, _, v, _, _, phi_q, phi_k = make_inputs("leap", 2, 200, 200, dtype)
    whole, whole_state = ops.causal_linear_attention(phi_q, phi_k, v, 16)
    first, state = ops.causal_linear_attention(phi_q[:, :split], phi_k[:, :split], v[:, :split], 16)
    second, final_state = ops.causal_linear_attention(
        phi_q[:, split:], phi_k[:, split:], v[:, split:], 16, initial_state=state
    )
    assert_close(torch.cat([first, second], dim=1), whole)
    assert_close(final_state.kv.to(dtype), whole_state.kv.to(dtype))
    assert_close(final_state.k_sum.to(dtype), whole_state.k_sum.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("target_length", (1, 9, 64, 300))
@pytest.mark.parametrize("attn_type", LINEAR_TYPES)
def test_prefix_limited_matches_naive(attn_type, target_length, dtype):
    source_length = 120
    q_t, k_t, v, p_q, p_k, phi_q, phi_k = make_inputs(
        attn_type, 3, target_length, source_length, dtype
    )
    padding = right_padding(3, source_length)
    # wait-k with k=3 for rows 0 and 1, a random non-decreasing schedule for row 2
    waitk = (torch.arange(target_length) + 3).clamp_max(source_length)
    random_limit = torch.randint(0, source_length + 1, (target_length,)).sort().values
    limit = torch.stack([waitk, waitk, random_limit])
    allowed = torch.arange(source_length)[None, None, :] < limit[:, :, None]
    expected = ops.naive_leap_attention(q_t, k_t, v, p_q, p_k, allowed, padding)
    assert_close(ops.prefix_linear_attention(phi_q, phi_k, v, limit, padding), expected)
    shared = ops.prefix_linear_attention(phi_q, phi_k, v, waitk, padding)
    assert_close(shared[:2], expected[:2])


@pytest.mark.parametrize("attn_type", LINEAR_TYPES)
def test_512_recurrent_steps_match_causal_parallel(attn_type):
    length = 512
    q_t, k_t, v, p_q, p_k, phi_q, phi_k = make_inputs(attn_type, 4, length, length, torch.float64)
    parallel, parallel_state = ops.causal_linear_attention(phi_q, phi_k, v, 64)
    state = ops.empty_state(4, phi_q.shape[-1], v.shape[-1], dtype=torch.float64)
    steps = []
    for i in range(length):
        state, out = ops.recurrent_step(state, *(x[:, i:i + 1] for x in (phi_q, phi_k, v)))
        steps.append(out)
    assert_close(torch.cat(steps, dim=1), parallel)
    assert_close(state.kv, parallel_state.kv)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    assert_close(parallel, ops.naive_leap_attention(q_t, k_t, v, p_q, p_k, causal))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_recurrent_state_stays_float32(dtype):
    _, _, v, _, _, phi_q, phi_k = make_inputs("leap", 2, 40, 40, torch.float32)
    reference, _ = ops.causal_linear_attention(phi_q, phi_k, v, 8)
    state = ops.empty_state(2, phi_q.shape[-1], v.shape[-1])
    for i in range(40):
        state, out = ops.recurrent_step(
            state, *(x[:, i:i + 1].to(dtype) for x in (phi_q, phi_k, v))
        )
        assert state.kv.dtype == torch.float32 and state.k_sum.dtype == torch.float32
        assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference[:, -1:], atol=2e-2, rtol=2e-2)


def test_update_state_ignores_padded_keys():
    _, _, v, _, _, _, phi_k = make_inputs("leap", 2, 1, 10, torch.float64)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[:, 6:] = True
    empty = ops.empty_state(2, phi_k.shape[-1], v.shape[-1], dtype=torch.float64)
    padded = ops.update_state(empty, phi_k, v, padding)
    trimmed = ops.update_state(empty, phi_k[:, :6], v[:, :6])
    assert_close(padded.kv, trimmed.kv)
    assert_close(padded.k_sum, trimmed.k_sum)


def test_positions_from_padding_count_real_tokens():
    padding = torch.tensor([[True, True, False, False, False], [False, False, False, True, True]])
    expected = torch.tensor([[0.0, 0.0, 0.0, 1.0, 2.0], [0.0, 1.0, 2.0, 2.0, 2.0]])
    assert torch.equal(ops.positions_from_padding(padding), expected)
    assert torch.equal(ops.positions_from_padding(padding, torch.tensor([3, 5])),
                       expected + torch.tensor([[3.0], [5.0]]))


def test_naive_softmax_matches_torch_sdpa():
    q, k, v = (torch.randn(3, 20, 8, dtype=torch.float64) for _ in range(3))
    padding = right_padding(3, 20)
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    allowed = causal[None] & ~padding[:, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, scale=1.0
    )
    actual = ops.naive_softmax_attention(q, k, v, causal, padding)
    assert_close(actual, expected)


def _gradcheck_inputs(attn_type, lq, lk):
    """fp64 leaf tensors: pre-relu projections, values and proportion logits."""
    q = torch.randn(2, lq, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, lk, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, lk, 3, dtype=torch.float64, requires_grad=True)
    p_q = torch.randn(2, lq, dtype=torch.float64, requires_grad=attn_type == "leap")
    p_k = torch.randn(2, lk, dtype=torch.float64, requires_grad=attn_type == "leap")
    return q, k, v, p_q, p_k


def _features(attn_type, x, p):
    x = ops.relu_features(x)
    return x if attn_type == "linear" else ops.sincos_features(x, torch.sigmoid(p)[..., None])


@pytest.mark.parametrize("attn_type", LINEAR_TYPES)
@pytest.mark.parametrize("form", ["bidirectional", "causal", "prefix", "causal with sums",
                                  "prefix with sums"])
def test_gradcheck_parallel_forms(attn_type, form):
    """Every parallel form, and the backend wrappers with the PyTorch sums."""
    lq, lk = (6, 9) if form.startswith("prefix") else (7, 7)
    q, k, v, p_q, p_k = _gradcheck_inputs(attn_type, lq, lk)
    padding = torch.zeros(2, lk, dtype=torch.bool)
    padding[1, -2:] = True
    limit = torch.tensor([1, 2, 4, 4, 7, 9])

    def attention(q, k, v, p_q, p_k):
        phi_q, phi_k = _features(attn_type, q, p_q), _features(attn_type, k, p_k)
        if form == "bidirectional":
            return ops.bidirectional_linear_attention(phi_q, phi_k, v, padding)
        if form == "causal":
            return ops.causal_linear_attention(phi_q, phi_k, v, 3, padding)[0]
        if form == "causal with sums":
            return ops.causal_linear_attention_with(ops.torch_causal_sums, phi_q, phi_k, v,
                                                    padding)[0]
        if form == "prefix with sums":
            return ops.prefix_linear_attention_with(ops.torch_causal_sums, phi_q, phi_k, v,
                                                    limit, padding)
        return ops.prefix_linear_attention(phi_q, phi_k, v, limit, padding)

    assert torch.autograd.gradcheck(attention, (q, k, v, p_q, p_k))


class ToyFeatureMap(torch.nn.Module):
    """Raw rows ``(B, b, c)`` -> LeaP features and values ``(B, b, d)``, with parameters."""

    def __init__(self, channels=6, d=4, dv=3, dtype=torch.float64):
        super().__init__()
        self.q_proj = torch.nn.Linear(channels, d, dtype=dtype)
        self.k_proj = torch.nn.Linear(channels, d, dtype=dtype)
        self.v_proj = torch.nn.Linear(channels, dv, dtype=dtype)
        self.leap_q = torch.nn.Linear(d, 1, dtype=dtype)
        self.leap_k = torch.nn.Linear(d, 1, dtype=dtype)

    def features(self, x):
        q, k = torch.relu(self.q_proj(x)), torch.relu(self.k_proj(x))
        phi_q = ops.sincos_features(q, torch.sigmoid(self.leap_q(q)))
        phi_k = ops.sincos_features(k, torch.sigmoid(self.leap_k(k)))
        return phi_q, phi_k

    def __call__(self, x_block, rows, with_values=True):
        phi_q, phi_k = self.features(x_block)
        return phi_q, phi_k, self.v_proj(x_block) if with_values else None


@pytest.mark.parametrize("recompute_values", [True, False])
@pytest.mark.parametrize("block_size", (1, 5, 16, 100))
def test_blockwise_matches_chunked_values_and_gradients(block_size, recompute_values):
    toy = ToyFeatureMap()
    x = torch.randn(2, 37, 6, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(2, 37, dtype=torch.bool)
    padding[1, 30:] = True
    external_values = None if recompute_values else torch.randn(2, 37, 3, dtype=torch.float64,
                                                                requires_grad=True)

    def feature_map(x_block, rows):
        return toy(x_block, rows, with_values=recompute_values)

    params = [p for name, p in toy.named_parameters()
              if recompute_values or not name.startswith("v_proj")]
    out = ops.blockwise_causal_linear_attention(
        x, feature_map, params, external_values, 4, block_size, padding
    )
    phi_q, phi_k = toy.features(x)
    v = toy.v_proj(x) if recompute_values else external_values
    expected, _ = ops.causal_linear_attention(phi_q, phi_k, v, 8, padding)
    assert_close(out, expected)
    cotangent = torch.randn_like(expected)
    leaves = [x, *params] + ([] if recompute_values else [external_values])
    ours = torch.autograd.grad(out, leaves, cotangent)
    reference = torch.autograd.grad(expected, leaves, cotangent)
    for actual, wanted in zip(ours, reference):
        assert_close(actual, wanted)


def test_gradcheck_blockwise():
    toy = ToyFeatureMap()
    x = torch.randn(1, 9, 6, dtype=torch.float64, requires_grad=True)
    weight = toy.leap_q.weight

    def attention(x, weight):
        return ops.blockwise_causal_linear_attention(x, toy, [weight], None, 2, 4)

    assert torch.autograd.gradcheck(attention, (x, weight))


def test_blockwise_passes_rows_to_the_feature_map():
    seen = []

    def feature_map(x_block, rows):
        seen.append((rows.start, rows.stop))
        features = torch.relu(x_block)
        return features, features, x_block

    x = torch.randn(1, 10, 3)
    ops.blockwise_causal_linear_attention(x, feature_map, block_size=4)
    assert seen == [(0, 4), (4, 8), (8, 10)]
