"""The fused decode step (``ops.fused_recurrent_step``, the ``step fused`` form): the compiled op
against the float64 naive reference in float32, its backend choice (``LEAPFORMER_STEP_BACKEND``)
and a failed build, reported once. The float64 comparison of every fusable variant is in
test_forms.py (``test_incremental_forms_match_the_float64_reference``)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_forms import decode, recorded_forms
from test_module import EMBED, make_module, reference

from leapformer_fairseq import ops

# Output error of the float32 steps, relative to max |reference output|, in float32's eps: the
# projections, the feature map (MLP, softmax, sin/cos) and the sums over f features each round a
# few times. Measured on these cases: 1.6-3.6 eps, except plain linear attention at 43 eps for the
# eager and the fused step alike (its ReLU features leave some denominators small, which
# amplifies the projections' rounding). So: at most 64 eps, and at most 2 eps more than the
# eager step's error on the same module and inputs.
FLOAT32_EPS = 64
FUSED_EXTRA_EPS = 2


def float32_decode_error(variant, norm, backend, cross, monkeypatch):
    """The float32 decode of one seeded module and input (self-attention, or cross-attention
    reading a source of 30 tokens, one query per call), its error against the float64
    reference (in float32's eps) and the forms it took."""
    monkeypatch.setenv(ops.STEP_BACKEND_VARIABLE, backend)
    length = 40
    kind = dict(encoder_decoder_attention=True) if cross else dict(self_attention=True,
                                                                   causal=True)
    module = make_module(variant, leap_input_norm=norm, **kind)
    with torch.no_grad():
        for parameter in module.parameters():  # LeaP's proportions away from their start
            parameter.add_(0.2 * torch.randn_like(parameter))
    forms = recorded_forms(module)
    x, source = 3 * torch.randn(length, 2, EMBED), 3 * torch.randn(30, 2, EMBED)
    with torch.no_grad():
        if cross:
            state = {}
            out = torch.cat([module(x[i:i + 1], source, source, incremental_state=state,
                                    static_kv=True)[0] for i in range(length)])
            expected = reference(module.double(), x.double(), source.double())
        else:
            out = decode(module, x)
            expected = reference(module.double(), x.double(), x.double(), None,
                                 torch.ones(length, length, dtype=torch.bool).tril())
    assert out.dtype == torch.float32
    error = (out.double() - expected).abs().max() / expected.abs().max()
    return float(error) / torch.finfo(torch.float32).eps, set(forms)


@pytest.mark.parametrize("cross", [False, True], ids=["step", "read"])
@pytest.mark.parametrize("variant,norm", [("leap", False), ("leap", True), ("linear", False),
                                          ("hedgehog", False), ("leap+hedgehog", False),
                                          ("leap+hedgehog", True)])
def test_fused_step_in_float32_matches_the_float64_reference(variant, norm, cross, monkeypatch):
    form = "read" if cross else "step"
    fused, forms = float32_decode_error(variant, norm, "cpp", cross, monkeypatch)
    assert forms == {form + " fused"}
    eager, forms = float32_decode_error(variant, norm, "torch", cross, monkeypatch)
    assert forms == {form}
    assert fused <= FLOAT32_EPS, f"error {fused:.1f} eps"
    assert fused <= eager + FUSED_EXTRA_EPS, f"fused {fused:.1f} eps, eager {eager:.1f} eps"


def test_step_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(ops.STEP_BACKEND_VARIABLE, "auto")
    with torch.no_grad():
        assert ops.select_step_backend(cpu, torch.float32) == "cpp"
        assert ops.select_step_backend(cpu, torch.float64) == "cpp"
        assert ops.select_step_backend(cpu, torch.bfloat16) == "torch"  # served eagerly
    assert ops.select_step_backend(cpu, torch.float32) == "torch"  # autograd on
    monkeypatch.setenv(ops.STEP_BACKEND_VARIABLE, "torch")
    with torch.no_grad():
        assert ops.select_step_backend(cpu, torch.float32) == "torch"
    monkeypatch.setenv(ops.STEP_BACKEND_VARIABLE, "cpp")
    with pytest.raises(ValueError, match="LEAPFORMER_STEP_BACKEND=cpp serves CPU float32/"
                                         "float64 decode steps without autograd; got cpu, "
                                         "torch.float32, autograd on"):
        ops.select_step_backend(cpu, torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match="got cpu, torch.float16"):
        ops.select_step_backend(cpu, torch.float16)
    monkeypatch.setenv(ops.STEP_BACKEND_VARIABLE, "fast")
    with pytest.raises(ValueError, match="LEAPFORMER_STEP_BACKEND='fast': choose one of auto, "
                                         "torch, cpp"):
        ops.select_step_backend(cpu, torch.float32)


@pytest.mark.parametrize("variant,kwargs,form", [
    ("cosformer", {}, "step"),  # positions: eager
    ("leap", {"dropout": 0.5}, "step"),  # dropout on the values in training mode: eager
    ("leap", {}, "step fused"),
])
def test_which_modules_take_the_fused_step(variant, kwargs, form, monkeypatch):
    monkeypatch.setenv(ops.STEP_BACKEND_VARIABLE, "auto")
    module = make_module(variant, self_attention=True, causal=True, **kwargs)
    module.train("dropout" in kwargs)
    forms = recorded_forms(module)
    with torch.no_grad():
        decode(module, torch.randn(3, 2, EMBED))
    assert set(forms) == {form}


FAILED_BUILD = textwrap.dedent("""
    import logging, torch
    logging.basicConfig(level=logging.WARNING)
    from leapformer_fairseq.modules import LeaPMultiheadAttention
    module = LeaPMultiheadAttention(16, 2, self_attention=True, causal=True).eval()
    x, state, outs = torch.randn(3, 1, 16), {}, []
    with torch.no_grad():
        for t in range(3):
            outs.append(module(x[t:t + 1], x[t:t + 1], x[t:t + 1], incremental_state=state)[0])
        expected = module(x, x, x, attn_mask=torch.full((3, 3), float("-inf")).triu(1))[0]
    torch.testing.assert_close(torch.cat(outs), expected)
    print("decoded")
""")


@pytest.mark.parametrize("backend", ["auto", "cpp"])
def test_a_failed_build_is_reported(backend, tmp_path):
    """A real failed build (no C++ compiler: ``CXX=false``, an empty extension folder): ``auto``
    warns once and decodes with the eager ops; ``cpp`` is an error naming the variable."""
    env = dict(os.environ, CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path),
               LEAPFORMER_STEP_BACKEND=backend)
    result = subprocess.run([sys.executable, "-c", FAILED_BUILD], env=env, capture_output=True,
                            text=True, timeout=300)
    if backend == "auto":
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "decoded"
        assert result.stderr.count("the fused CPU decode step did not build") == 1
        assert "LEAPFORMER_STEP_BACKEND=torch skips the build" in result.stderr
    else:
        assert result.returncode != 0
        assert "ValueError: LEAPFORMER_STEP_BACKEND=cpp: the fused step did not build" \
            in result.stderr


def test_the_op_refuses_mismatched_shapes():
    """A state or parameter of the wrong shape is an error naming it, not a read past it."""
    module = make_module("leap", self_attention=True, causal=True)
    layers = module._side_parameters("qk")
    n, dim = 4, module.head_dim
    state = ops.linear_attention.empty_state(n, 2 * dim, dim)
    u, v = torch.randn(2, n, dim), torch.randn(n, dim)
    with torch.no_grad():
        ops.fused_recurrent_step(state, u, v, layers)  # the right shapes run
        with pytest.raises(RuntimeError, match=r"fused_step: v is \[4, 7\], expected \[4, 8\]"):
            ops.fused_recurrent_step(state, u, torch.randn(n, dim - 1), layers)
        wrong = dict(layers, hidden=(layers["hidden"][0][:, :-1], layers["hidden"][1]))
        with pytest.raises(RuntimeError, match="fused_step: the hidden weight is"):
            ops.fused_recurrent_step(state, u, v, wrong)
