"""The form table of ``LeaPMultiheadAttention`` (``FORMS``, ``select_form``): which form each call
takes, and every form against the float64 naive reference (values and gradients), in fp16/bf16
too for the forms new with the table (the short causal form and the eager decode step)."""
import itertools

import pytest
import torch
from test_module import EMBED, LINEAR_VARIANTS, make_module, reference, right_padding

from leapformer_fairseq import ops
from leapformer_fairseq.modules.leap_multihead_attention import (
    FORMS,
    FUSED_STEP_TYPES,
    SHORT_FORM_MAX_LENGTH,
)

CPU = torch.device("cpu")


def expected_form(self_attention, incremental, causal, key_limit, padded, unit_causal, length,
                  short_max, backend, fusable):
    """The table ``select_form`` implements, written out (``backend``: of the causal sums in
    parallel calls, of the decode step in incremental ones)."""
    kernel = backend != "torch"
    if not self_attention:
        if incremental:
            return "read fused" if backend == "cpp" and fusable and length == 1 else "read"
        if key_limit:
            return "prefix kernel" if kernel else "prefix"
        return "bidirectional"
    if incremental:
        if unit_causal:
            return "step units"
        if length > 1 or padded:
            return "step chunked"
        return "step fused" if backend == "cpp" and fusable else "step"
    if key_limit:
        return "prefix kernel" if kernel else "prefix"
    if not causal:
        return "bidirectional"
    if kernel:
        return "causal kernel"
    return "causal short" if length <= short_max else "causal blockwise"


def test_select_form_covers_every_call_and_every_form():
    reached = set()
    for self_attention, unit_causal, short_max, variant in itertools.product(
            (True, False), (False, True), (None, 0, 32), ("leap", "cosformer")):
        if unit_causal and not self_attention:
            continue
        kwargs = (dict(self_attention=True, causal=unit_causal, unit_causal=unit_causal,
                       frames_per_unit=2) if self_attention
                  else dict(encoder_decoder_attention=True))
        module = make_module(variant, short_form_max_length=short_max, **kwargs)
        for incremental, causal, key_limit, padded, length in itertools.product(
                (False, True), (False, True), (False, True), (False, True),
                (1, 32, 33, 65, 129)):
            for backend in ("torch", "cpp") if incremental else ("torch", "torch-sums"):
                form = module.select_form(length, incremental, causal, key_limit, padded, CPU,
                                          backend)
                threshold = SHORT_FORM_MAX_LENGTH["cpu"] if short_max is None else short_max
                assert form == expected_form(self_attention, incremental, causal, key_limit,
                                             padded, unit_causal, length, threshold, backend,
                                             variant in FUSED_STEP_TYPES)
                reached.add(form)
    assert reached == set(FORMS)


def recorded_forms(module):
    """Make ``module`` record the form of each call in the returned list."""
    forms, select = [], module.select_form

    def recording(*args):
        forms.append(select(*args))
        return forms[-1]

    module.select_form = recording
    return forms


def parallel_case(form, variant):
    """A float64 module, its inputs and the reference's attention mask for a parallel ``form``."""
    length, source_length = 12, 9
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    if form in ("causal short", "causal blockwise", "causal kernel"):
        short = 64 if form == "causal short" else 0
        module = make_module(variant, self_attention=True, causal=True, chunk_size=4,
                             block_size=5, short_form_max_length=short)
        return module, length, length, {}, causal, right_padding(2, length)
    if form == "bidirectional":
        module = make_module(variant, encoder_decoder_attention=True)
        return module, length, source_length, {}, None, right_padding(2, source_length)
    limit = (torch.arange(length) + 3).clamp_max(source_length)  # the prefix forms: wait-3
    module = make_module(variant, encoder_decoder_attention=True)
    allowed = torch.arange(source_length) < limit.unsqueeze(-1)
    return module, length, source_length, {"key_limit": limit}, allowed, None


@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
@pytest.mark.parametrize("form", ["bidirectional", "prefix", "causal short", "causal blockwise",
                                  "prefix kernel", "causal kernel"])
def test_parallel_forms_match_the_float64_reference_with_gradients(form, variant, monkeypatch):
    """The kernel forms run on the ``torch-sums`` backend: the wrappers a GPU backend uses,
    with the PyTorch numerator."""
    if form.endswith("kernel"):
        monkeypatch.setenv(ops.BACKEND_VARIABLE, "torch-sums")
    module, length, source_length, call, allowed, padding = parallel_case(form, variant)
    module = module.double().train()  # gradients of every parameter, dropout 0
    forms = recorded_forms(module)
    x = torch.randn(length, 2, EMBED, dtype=torch.float64, requires_grad=True)
    source = x if module.self_attention else torch.randn(source_length, 2, EMBED,
                                                         dtype=torch.float64)
    out, _ = module(x, source, source, key_padding_mask=padding, **call)
    assert forms == [form]
    assert_matches_reference_with_gradients(module, out, x, source, padding, allowed)


def assert_matches_reference_with_gradients(module, out, x, source, padding, allowed):
    """``out`` of a float64 parallel call ``module(x, source, source, key_padding_mask=padding,
    ...)`` against the naive reference (queries may see the keys ``allowed``), and the gradients
    of ``x`` and every parameter under the same random cotangent (padded rows excluded)."""
    expected = reference(module, x, source, padding, allowed)
    keep = slice(None) if padding is None or not module.self_attention else ~padding.T
    torch.testing.assert_close(out[keep], expected[keep], atol=1e-12, rtol=1e-10)
    cotangent = torch.randn_like(out).masked_fill(~keep[..., None], 0.0) \
        if isinstance(keep, torch.Tensor) else torch.randn_like(out)
    leaves = [x, *module.parameters()]
    ours = torch.autograd.grad(out, leaves, cotangent, allow_unused=True)
    theirs = torch.autograd.grad(expected, leaves, cotangent, allow_unused=True)
    for name, actual, wanted in zip(["x", *dict(module.named_parameters())], ours, theirs):
        if wanted is None:
            assert actual is None or not actual.any(), name
        else:
            torch.testing.assert_close(actual, wanted, atol=1e-10, rtol=1e-8, msg=name)


def decode(module, x, padding=None, block=1, unit=False):
    """Self-attention over ``x`` (T, B, C) incrementally, ``block`` tokens per call."""
    state, outs = {}, []
    for start in range(0, x.size(0), block):
        rows = slice(start, start + block)
        mask = None if padding is None else padding[:, rows]
        outs.append(module(x[rows], x[rows], x[rows], key_padding_mask=mask,
                           incremental_state=state, need_weights=False)[0])
    return torch.cat(outs)


@pytest.mark.parametrize("form,variant", [
    (form, variant)
    for form in ("step", "step fused", "step chunked", "step units", "read", "read fused")
    for variant in LINEAR_VARIANTS
    if not form.endswith("fused") or variant.partition("+")[0] in FUSED_STEP_TYPES])
def test_incremental_forms_match_the_float64_reference(form, variant, monkeypatch):
    """``step``/``read`` and ``step fused``/``read fused``: the eager ops and the compiled op
    (inference)."""
    fused = form.endswith("fused")
    monkeypatch.setenv(ops.STEP_BACKEND_VARIABLE, "cpp" if fused else "torch")
    length = 9
    x = torch.randn(length, 2, EMBED, dtype=torch.float64)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    if form.startswith("read"):
        module = make_module(variant, encoder_decoder_attention=True).double()
        source, padding = torch.randn(7, 2, EMBED, dtype=torch.float64), right_padding(2, 7)
        forms = recorded_forms(module)
        state = {}
        with torch.set_grad_enabled(not fused):
            out = torch.cat([module(x[i:i + 1], source, source, key_padding_mask=padding,
                                    incremental_state=state, static_kv=True)[0]
                             for i in range(length)])
        expected = reference(module, x, source, padding)
    else:
        unit = form == "step units"
        module = make_module(variant, self_attention=True, causal=True, unit_causal=unit,
                             frames_per_unit=3 if unit else 1).double()
        forms = recorded_forms(module)
        # "step chunked": several tokens per call, or one padded token (left padding)
        padding = None
        if form == "step chunked":
            padding = torch.zeros(2, length, dtype=torch.bool)
            padding[1, :2] = True
        with torch.set_grad_enabled(not fused):
            out = decode(module, x, padding, block=3 if unit else 1)
        if unit:
            causal = torch.arange(length) < ((torch.arange(length) // 3 + 1) * 3).unsqueeze(-1)
        expected = reference(module, x, x, padding, causal)
        if padding is not None:
            out, expected = out[~padding.T], expected[~padding.T]
    assert set(forms) == {form}
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)


# Output error of the half-precision forms, relative to max |reference output|, in eps of the
# dtype. The projections, feature maps and output projection run in the dtype (each rounding
# its result, about eps / 2 relative, and the feature map's MLP, softmax and sin/cos a few
# roundings more); every sum over keys runs in float32 (docs/math.md §3), so the error does not
# grow with the length. Measured: at most 1.1 eps (Hedgehog's features in bf16); 4 eps leaves
# room, and an fp16 sum over the 40 keys would err by about 40 eps.
HALF_EPS = 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
@pytest.mark.parametrize("form", ["causal short", "step"])
def test_short_form_and_step_in_half_precision(form, variant, dtype):
    length = 40
    module = make_module(variant, self_attention=True, causal=True,
                         short_form_max_length=64).to(dtype)
    forms = recorded_forms(module)
    x = (3 * torch.randn(length, 2, EMBED)).to(dtype)
    with torch.no_grad():
        out = module(x, x, x, need_weights=False)[0] if form == "causal short" \
            else decode(module, x)
        assert set(forms) == {form}
        reference_module = make_module(variant, self_attention=True, causal=True)
        reference_module.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        expected = reference(reference_module.double(), x.double(), x.double(), None, causal)
    assert out.dtype == dtype
    error = (out.double() - expected).abs().max() / expected.abs().max()
    assert error <= HALF_EPS * torch.finfo(dtype).eps, f"error {error:.3g}"


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
def test_step_follows_parameter_changes(variant, backend, monkeypatch):
    """The decode steps (eager; ``auto``: compiled where the type allows) keep their fused
    weights between calls (inference); an in-place change, a state dict load or a cast of the
    parameters is seen by the next step."""
    monkeypatch.setenv(ops.STEP_BACKEND_VARIABLE, backend)
    module = make_module(variant, self_attention=True, causal=True)
    other = make_module(variant, self_attention=True, causal=True)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    x = torch.randn(5, 2, EMBED)
    with torch.no_grad():
        decode(module, x)
        module.load_state_dict(other.state_dict())
        torch.testing.assert_close(decode(module, x), decode(other, x))
        for ours, theirs in zip(module.parameters(), other.parameters()):
            ours.mul_(1.5)
            theirs.mul_(1.5)
        torch.testing.assert_close(decode(module, x), decode(other, x))
        module.double()
        assert decode(module, x.double()).dtype == torch.float64
