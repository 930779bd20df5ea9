"""``compile_feature_map``: training passes compute the feature map through ``torch.compile``
(``ops.Compiled``). The compiled map against the float64 naive reference (values and gradients)
where each parallel form reads it, in fp16/bf16 within the half-precision forms' bound, eager
outside training, a model's training steps within the graph limit, and one warning then the
eager map where compilation fails."""
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from test_forms import (
    HALF_EPS,
    assert_matches_reference_with_gradients,
    parallel_case,
    recorded_forms,
)
from test_module import EMBED, LINEAR_VARIANTS, make_module, reference

from leapformer_fairseq.modules import leap_multihead_attention
from leapformer_fairseq.modules.leap_multihead_attention import LeaPMultiheadAttention

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles its own graphs: the many configurations of this file together would
    pass ``COMPILED_FEATURES``' limit of graphs."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_graphs() -> int:
    """Graphs PyTorch has compiled in this process so far (``torch._dynamo.reset`` keeps the
    count): a call that compiled nothing leaves it unchanged."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def eager_calls(module):
    """Record each eager call of ``module._features`` in the returned list (the compiled map
    calls the class's function, not the instance's attribute)."""
    calls, eager = [], module._features

    def recording(*args):
        calls.append(args[1])
        return eager(*args)

    module._features = recording
    return calls


@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
@pytest.mark.parametrize("form", ["prefix", "causal short", "causal blockwise"])
def test_compiled_feature_map_matches_the_float64_reference_with_gradients(form, variant):
    """One form per place the parallel map is read: self-attention (``causal short``), the
    blockwise form's blocks, recomputed in backward, and cross-attention (``prefix``; the
    bidirectional form reads the same map)."""
    module, length, source_length, call, allowed, padding = parallel_case(form, variant)
    module.compile_feature_map = True
    module = module.double().train()
    forms, calls = recorded_forms(module), eager_calls(module)
    x = torch.randn(length, 2, EMBED, dtype=torch.float64, requires_grad=True)
    source = x if module.self_attention else torch.randn(source_length, 2, EMBED,
                                                         dtype=torch.float64)
    graphs = compiled_graphs()
    out, _ = module(x, source, source, key_padding_mask=padding, **call)
    assert forms == [form] and calls == [] and compiled_graphs() > graphs
    assert leap_multihead_attention.COMPILED_FEATURES.error is None
    assert_matches_reference_with_gradients(module, out, x, source, padding, allowed)
    module.eval()  # evaluation stays eager
    module(x, source, source, key_padding_mask=padding, **call)
    assert calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["leap", "leap+hedgehog", "cosformer"])
def test_compiled_feature_map_in_half_precision(variant, dtype):
    """The bound of the eager half-precision forms (``HALF_EPS`` eps of the dtype, relative to
    the largest output) holds for the compiled map too."""
    length = 40
    module = make_module(variant, self_attention=True, causal=True, short_form_max_length=64,
                         compile_feature_map=True).to(dtype).train()
    calls = eager_calls(module)
    x = (3 * torch.randn(length, 2, EMBED)).to(dtype)
    graphs = compiled_graphs()
    with torch.no_grad():
        out = module(x, x, x, need_weights=False)[0]
        reference_module = make_module(variant, self_attention=True, causal=True)
        reference_module.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        expected = reference(reference_module.double(), x.double(), x.double(), None, causal)
    assert calls == [] and compiled_graphs() > graphs and out.dtype == dtype
    error = (out.double() - expected).abs().max() / expected.abs().max()
    assert error <= HALF_EPS * torch.finfo(dtype).eps, f"error {error:.3g}"


# Run in a process of its own: PyTorch keeps what it learnt of the compiler for the process.
FAILING_COMPILER = """
import logging, sys
import torch, torch._inductor.config
sys.path.insert(0, {tests!r})
from test_module import EMBED, make_module
torch._inductor.config.cpp.cxx = ("/nonexistent/c++",)
torch._inductor.config.fx_graph_cache = False
records = []
handler = logging.Handler(logging.WARNING)
handler.emit = records.append
logging.getLogger("leapformer_fairseq").addHandler(handler)
module = make_module("leap", self_attention=True, causal=True, compile_feature_map=True).train()
reference = make_module("leap", self_attention=True, causal=True).train()
x = torch.randn(12, 2, EMBED)
for _ in range(2):
    torch.testing.assert_close(module(x, x, x)[0], reference(x, x, x)[0])
print("\\n".join(record.getMessage() for record in records))
"""


def test_a_failing_compiler_warns_once_and_runs_the_eager_map():
    """No C++ compiler (the real failure, not a stand-in): one warning naming the option and
    the compiler's error, then the eager map, with the same numbers."""
    done = subprocess.run([sys.executable, "-c", FAILING_COMPILER.format(tests=str(TESTS))],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = done.stdout.strip().splitlines()
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("compile_feature_map (--compile-feature-map): torch.compile "
                                  "failed")
    assert "No working C++ compiler found" in warnings[0]


def test_a_model_trains_with_the_compiled_map_within_the_graph_limit(caplog):
    """The option reaches every linear block; training steps of a wait-k model on batches of
    several shapes give the eager model's loss and gradients, and PyTorch never reaches the
    limit of graphs (past it, it would run the map eagerly with a warning)."""
    from test_models import build

    models = {}
    for flag in (False, True):
        torch.manual_seed(0)
        models[flag], dictionary = build("leapformer_waitk_transformer_tiny", waitk_lagging=2,
                                         leap_feature_map="hedgehog", compile_feature_map=flag)
        blocks = [m for m in models[flag].modules() if isinstance(m, LeaPMultiheadAttention)]
        assert blocks and all(block.compile_feature_map == flag for block in blocks)
    models[True].load_state_dict(models[False].state_dict())
    calls = [eager_calls(m) for m in models[True].modules()
             if isinstance(m, LeaPMultiheadAttention) and m.attn_type != "softmax"]
    generator = torch.Generator().manual_seed(0)
    graphs = compiled_graphs()
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        for batch, source_length, target_length in ((3, 7, 9), (5, 11, 6), (2, 16, 15)):
            source = torch.randint(dictionary.nspecial, len(dictionary),
                                   (batch, source_length), generator=generator)
            target = torch.randint(dictionary.nspecial, len(dictionary),
                                   (batch, target_length), generator=generator)
            lengths = torch.full((batch,), source_length)
            results = []
            for flag in (False, True):
                model = models[flag].train()
                logits, _ = model(source, lengths, target)
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), target.reshape(-1))
                loss.backward()
                results.append([loss.detach()] + [p.grad for p in model.parameters()])
                model.zero_grad(set_to_none=True)
            for eager, compiled in zip(*results):
                torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
    assert calls and not any(calls) and compiled_graphs() > graphs
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
    assert leap_multihead_attention.COMPILED_FEATURES.error is None
