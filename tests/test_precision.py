"""fp16/bf16 inputs: every form accumulates in float32 (docs/math.md §3, "Precision").

Each form gets half-precision features whose denominators ``sum_j s_ij`` exceed fp16's largest
finite value 65504, and is compared with the float64 naive reference computed from the same
half-precision inputs (cast exactly to float64), so only the computation error is measured.
"""
import pytest
import torch

from leapformer_fairseq import ops

HALF_DTYPES = (torch.float16, torch.bfloat16)
FORMS = ("causal", "blockwise", "bidirectional", "prefix", "recurrent")
LENGTH = 8192
FEATURES, VALUE_DIM = 4, 3
FP16_MAX = torch.finfo(torch.float16).max
# Output error bound, in eps of the input dtype, relative to max |v|:
# - the output is a convex combination of values, so rounding it to the input dtype costs at
#   most eps / 2 * max |v|;
# - a float32 sum of n terms errs by at most n * eps32 * (sum of the terms' magnitudes). With
#   s_ij >= 0 that is n eps32 * den for the denominator and n eps32 * den * max |v| for the
#   numerator, so the output errs by at most about 2 n eps32 * max |v|; with n <= LENGTH,
#   2 * 8192 * 1.19e-7 = 1.95e-3, i.e. 2.0 fp16 eps or 0.25 bf16 eps (worst case).
# 0.5 + 2.0 <= 3. Summed in fp16, these denominators and numerators overflow to inf (nan out).
OUTPUT_EPS = 3


def make_inputs(dtype, length=LENGTH):
    """``(1, L, f)`` features in [0, 4) (``s_ij`` averages 16) and ``(1, L, dv)`` values of mean 2,
    so that numerators overflow fp16 too and outputs are far from 0."""
    generator = torch.Generator().manual_seed(0)
    q = 4 * torch.rand(1, length, FEATURES, generator=generator)
    k = 4 * torch.rand(1, length, FEATURES, generator=generator)
    v = 2 + torch.randn(1, length, VALUE_DIM, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def row_blocks(rows_per_block=1024):
    """Slices of the query rows: the float64 ``L x L`` matrices are built one slice at a time."""
    return [slice(start, start + rows_per_block) for start in range(0, LENGTH, rows_per_block)]


def naive_in_row_blocks(q, k, v, allowed):
    """``naive_leap_attention`` in float64 on row slices of the queries (and of ``allowed``)."""
    q, k, v = (x.double() for x in (q, k, v))
    return torch.cat([ops.naive_leap_attention(q[:, rows], k, v, attn_allowed=allowed[rows])
                      for rows in row_blocks()], dim=1)


def reference_denominators(q, k, allowed):
    """``(L,)`` float64 ``sum_j s_ij`` over the keys query i sees."""
    q, k = q[0].double(), k[0].double()
    return torch.cat([(q[rows] * (allowed[rows].double() @ k)).sum(dim=-1)
                      for rows in row_blocks()])


def wait_k_limit(length, k=3):
    return (torch.arange(length) + k).clamp_max(length)


def allowed_keys(form):
    """Bool ``(L, L)``: which keys each query of ``form`` sees."""
    key_index = torch.arange(LENGTH)
    if form == "bidirectional":
        return torch.ones(LENGTH, LENGTH, dtype=torch.bool)
    if form == "prefix":
        return key_index[None, :] < wait_k_limit(LENGTH)[:, None]
    return key_index[None, :] <= key_index[:, None]


def run_form(form, q, k, v):
    """The output of ``form`` on ``(1, L, f)`` features and ``(1, L, dv)`` values."""
    length = q.shape[1]
    if form == "causal":
        out, state = ops.causal_linear_attention(q, k, v, 64)
        assert state.kv.dtype == state.k_sum.dtype == ops.state_dtype(q.dtype)
        return out
    if form == "bidirectional":
        return ops.bidirectional_linear_attention(q, k, v)
    if form == "prefix":
        return ops.prefix_linear_attention(q, k, v, wait_k_limit(length))
    if form == "blockwise":
        def feature_map(x_block, rows):
            return x_block[..., :FEATURES], x_block[..., FEATURES:], None

        return ops.blockwise_causal_linear_attention(
            torch.cat([q, k], dim=-1), feature_map, values=v, chunk_size=64,
            block_size=length // 8 + 1,
        )
    state = ops.empty_state(1, FEATURES, VALUE_DIM, dtype=q.dtype)
    outputs = []
    for i in range(length):
        state, out = ops.recurrent_step(state, *(x[:, i:i + 1] for x in (q, k, v)))
        outputs.append(out)
    assert state.kv.dtype == state.k_sum.dtype == ops.state_dtype(q.dtype)
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_half_precision_forms_match_float64_naive(form, dtype):
    """Error of the form <= OUTPUT_EPS * eps(dtype) * max |v| (see OUTPUT_EPS for the budget)."""
    q, k, v = make_inputs(dtype)
    allowed = allowed_keys(form)
    assert reference_denominators(q, k, allowed).max() > 2 * FP16_MAX  # covers fp16 overflow
    expected = naive_in_row_blocks(q, k, v, allowed)
    with torch.no_grad():
        actual = run_form(form, q, k, v)
    assert actual.dtype == dtype
    error = (actual.double() - expected).abs().max() / v.double().abs().max()
    eps = torch.finfo(dtype).eps
    assert error <= OUTPUT_EPS * eps, f"{form} {dtype}: error {error / eps:.3g} eps"


@pytest.mark.parametrize("form", FORMS)
def test_forms_compute_in_float32_under_autocast(form):
    """bf16 autocast does not reach the sums: float32 inputs give the float32 result (up to
    float32 rounding, 1e-6 relative; bf16 matmuls would err by about bf16's eps, 7.8e-3)."""
    q, k, v = make_inputs(torch.float32, length=300)
    with torch.no_grad():
        expected = run_form(form, q, k, v)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = run_form(form, q, k, v)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * v.abs().max().item())


class LinearFeatureMap(torch.nn.Module):
    """Rows ``(B, b, c)`` -> LeaP features and values through ``nn.Linear`` (which autocast
    runs in bf16)."""

    def __init__(self, channels=16, d=8, dv=8):
        super().__init__()
        self.q_proj = torch.nn.Linear(channels, d)
        self.k_proj = torch.nn.Linear(channels, d)
        self.v_proj = torch.nn.Linear(channels, dv)
        self.leap_q = torch.nn.Linear(d, 1)
        self.leap_k = torch.nn.Linear(d, 1)

    def forward(self, x_block, rows):
        q, k = torch.relu(self.q_proj(x_block)), torch.relu(self.k_proj(x_block))
        phi_q = ops.sincos_features(q, torch.sigmoid(self.leap_q(q)))
        phi_k = ops.sincos_features(k, torch.sigmoid(self.leap_k(k)))
        return phi_q, phi_k, self.v_proj(x_block)


def plain_blockwise(x, feature_map, chunk_size, block_size, padding):
    """The computation of the blockwise Function, block by block, differentiated by autograd."""
    outputs, state = [], None
    for start in range(0, x.shape[1], block_size):
        rows = slice(start, start + block_size)
        phi_q, phi_k, v = feature_map(x[:, rows], rows)
        out, state = ops.causal_linear_attention(phi_q, phi_k, v, chunk_size, padding[:, rows],
                                                 initial_state=state)
        outputs.append(out)
    return torch.cat(outputs, dim=1)


def test_blockwise_under_bf16_autocast_matches_autograd_and_float32():
    """The Function recomputes blocks in backward under the forward's autocast state.

    Against plain autograd through the same blocks under the same autocast: equal up to float32
    rounding (1e-5 relative to the largest entry, far below bf16's eps of 7.8e-3; both run the
    same ops on the same data). The autocast weight cache is off: with it, plain autograd would
    sum the per-block gradients of the one bf16 copy of each weight in bf16, while the Function
    sums them in float32. Against float32 without autocast: within 16 bf16 eps relative to the
    largest entry; the bf16 projections round their inputs, weights and outputs (about 1.5 eps
    each) and the features and gradients compound a few of those (about 5 eps measured).
    """
    torch.manual_seed(0)
    feature_map = LinearFeatureMap()
    params = list(feature_map.parameters())
    x = torch.randn(2, 300, 16, requires_grad=True)
    padding = torch.zeros(2, 300, dtype=torch.bool)
    padding[1, 250:] = True
    cotangent = torch.randn(2, 300, 8)
    chunk_size, block_size = 16, 64

    def blockwise():
        return ops.blockwise_causal_linear_attention(x, feature_map, params, None, chunk_size,
                                                     block_size, padding)

    def plain():
        return plain_blockwise(x, feature_map, chunk_size, block_size, padding)

    results = {}
    for name, compute, autocast in [("blockwise", blockwise, True), ("plain", plain, True),
                                    ("float32", plain, False)]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            out = compute()
        # backward outside the autocast region, as in a training loop
        results[name] = [out, *torch.autograd.grad(out, [x, *params], cotangent)]
    assert results["blockwise"][0].dtype == torch.bfloat16

    def relative_error(actual, expected):
        return ((actual.float() - expected.float()).abs().max() / expected.abs().max()).item()

    bf16_eps = torch.finfo(torch.bfloat16).eps
    for blockwise_value, plain_value, float32_value in zip(*results.values()):
        assert relative_error(blockwise_value, plain_value) <= 1e-5
        assert relative_error(blockwise_value, float32_value) <= 16 * bf16_eps
