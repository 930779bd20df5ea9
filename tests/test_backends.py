"""The backend wrappers (``ops.causal_linear_attention_with``, ``ops.prefix_linear_attention_with``)
with an injected PyTorch numerator against the float64 naive reference, in fp16/bf16 too (their
gradcheck is in test_ops.py); the wait-k merge on any limits; backend selection and its errors;
fla-core on CUDA when present."""
import pytest
import torch
from test_ops import LINEAR_TYPES, make_inputs, right_padding

from leapformer_fairseq import ops

SUMS = ops.torch_causal_sums
CUDA_FLA = torch.cuda.is_available() and ops.linear_attention.backends._fla_importable()


def naive(q, k, v, allowed=None, padding=None):
    return ops.naive_leap_attention(q, k, v, attn_allowed=allowed, key_padding_mask=padding)


@pytest.mark.parametrize("attn_type", LINEAR_TYPES)
@pytest.mark.parametrize("length", [1, 7, 64, 130])
def test_causal_wrapper_matches_naive(attn_type, length):
    *_, q, k = make_inputs(attn_type, 3, length, length, torch.float64)
    v = torch.randn(3, length, 5, dtype=torch.float64)
    padding = right_padding(3, length)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    out, state = ops.causal_linear_attention_with(SUMS, q, k, v, padding, 0.1,
                                                  output_final_state=True)
    torch.testing.assert_close(out, naive(q, k, v, causal, padding), atol=1e-10, rtol=1e-10)
    _, whole = ops.causal_linear_attention(q, k, v, 64, padding, 0.1)
    torch.testing.assert_close(state.kv, whole.kv, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(state.k_sum, whole.k_sum, atol=1e-10, rtol=1e-10)


def test_causal_wrapper_continues_from_a_state():
    *_, q, k = make_inputs("leap", 2, 50, 50, torch.float64)
    v = torch.randn(2, 50, 4, dtype=torch.float64)
    first, state = ops.causal_linear_attention_with(SUMS, q[:, :20], k[:, :20], v[:, :20],
                                                    output_final_state=True)
    second, _ = ops.causal_linear_attention_with(SUMS, q[:, 20:], k[:, 20:], v[:, 20:],
                                                 initial_state=state)
    whole, _ = ops.causal_linear_attention(q, k, v)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-10, rtol=1e-10)


def wait_k(query_length, key_length, k=3):
    return (torch.arange(query_length) + k).clamp_max(key_length)


@pytest.mark.parametrize("attn_type", LINEAR_TYPES)
@pytest.mark.parametrize("limits", ["wait-k", "per row", "arbitrary"])
def test_prefix_merge_matches_naive(attn_type, limits):
    """The merged causal call is exact for wait-k limits, per-row limits and limits in any order
    (equal, zero, past the keys)."""
    query_length, key_length = 11, 9
    *_, q, k = make_inputs(attn_type, 3, query_length, key_length, torch.float64)
    v = torch.randn(3, key_length, 5, dtype=torch.float64)
    limit = wait_k(query_length, key_length)
    if limits == "per row":
        limit = torch.stack([limit, wait_k(query_length, key_length, 1),
                             wait_k(query_length, key_length, 6)])
    elif limits == "arbitrary":
        limit = torch.tensor([4, 0, 9, 2, 2, 12, 7, 1, 5, 3, 8])
    padding = right_padding(3, key_length)
    query_padding = right_padding(3, query_length, generator_seed=2)
    out = ops.prefix_linear_attention_with(SUMS, q, k, v, limit, padding, query_padding)
    allowed = torch.arange(key_length) < limit.unsqueeze(-1)
    if allowed.dim() == 2:
        allowed = allowed.expand(3, -1, -1)
    expected = naive(q, k, v, allowed, padding).masked_fill(query_padding[..., None], 0.0)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


# Half-precision inputs (exactly representable in float64 for the reference): the numerator and
# denominator sums are float32, so the output errs by its own rounding (eps / 2 relative) plus
# float32 sums, far below 1 eps at these lengths; 2 eps of the dtype leaves room, while fp16
# sums over these 300 keys would err by hundreds of eps.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", ["causal", "prefix"])
def test_wrappers_in_half_precision(form, dtype):
    length = 300
    *_, q, k = make_inputs("leap", 2, length, length, torch.float64)
    q, k = (4 * q).to(dtype), (4 * k).to(dtype)
    v = (2 + torch.randn(2, length, 5)).to(dtype)
    if form == "causal":
        out = ops.causal_linear_attention_with(SUMS, q, k, v)[0]
        allowed = torch.ones(length, length, dtype=torch.bool).tril()
    else:
        limit = wait_k(length, length)
        out = ops.prefix_linear_attention_with(SUMS, q, k, v, limit)
        allowed = torch.arange(length) < limit.unsqueeze(-1)
    assert out.dtype == dtype
    expected = naive(q.double(), k.double(), v.double(), allowed)
    error = (out.double() - expected).abs().max() / v.double().abs().max()
    assert error <= 2 * torch.finfo(dtype).eps, f"error {error:.3g}"


def test_select_backend_names_the_variable(monkeypatch):
    monkeypatch.delenv(ops.BACKEND_VARIABLE, raising=False)
    assert ops.select_backend(torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setenv(ops.BACKEND_VARIABLE, "torch-sums")
    assert ops.select_backend(torch.device("cpu"), torch.bfloat16) == "torch-sums"
    monkeypatch.setenv(ops.BACKEND_VARIABLE, "triton")
    with pytest.raises(ValueError, match="LEAPFORMER_ATTENTION_BACKEND='triton': choose one"):
        ops.select_backend(torch.device("cpu"), torch.float32)
    monkeypatch.setenv(ops.BACKEND_VARIABLE, "fla")
    with pytest.raises(ValueError, match="LEAPFORMER_ATTENTION_BACKEND=fla runs on CUDA"):
        ops.select_backend(torch.device("cpu"), torch.float32)


@pytest.mark.skipif(not CUDA_FLA, reason="needs CUDA and fla-core")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["causal", "prefix"])
def test_fla_backend_matches_torch_on_cuda(form, dtype):
    torch.manual_seed(0)
    *_, q, k = make_inputs("leap", 4, 500, 500, torch.float32, d=16, dv=32)
    q, k = q.cuda().to(dtype), k.cuda().to(dtype)
    v = torch.randn(4, 500, 32, device="cuda").to(dtype)
    padding = right_padding(4, 500).cuda()
    if form == "causal":
        ours = ops.causal_linear_attention_with(ops.fla_causal_sums, q, k, v, padding)[0]
        theirs = ops.causal_linear_attention(q, k, v, 64, padding)[0]
    else:
        limit = wait_k(500, 500).cuda()
        ours = ops.prefix_linear_attention_with(ops.fla_causal_sums, q, k, v, limit, padding)
        theirs = ops.prefix_linear_attention(q, k, v, limit, padding)
    scale = 4 * torch.finfo(dtype).eps if dtype == torch.bfloat16 else 1e-3  # TF32 matmuls
    assert (ours.float() - theirs.float()).abs().max() <= scale * v.float().abs().max()
