"""Attention speed and memory: fairseq softmax, torch SDPA, linear, cosFormer, LeaP, and LeaP over
Hedgehog's features.

Forward+backward time and peak memory against sequence length, causal and bidirectional;
per-token decode time against position (softmax with a key/value cache vs LeaP's recurrent
state); and the cut-over sweep of causal LeaP's short form (one masked L x L chunk) against its
blockwise form at sentence lengths, which sets ``SHORT_FORM_MAX_LENGTH``. Every measurement runs
in its own child process, so peak memory is that of one configuration and an out-of-memory
softmax is recorded instead of ending the run; the decode steps of all methods share one, to be
timed side by side.

    python benchmarks/attention.py                      # CPU, full sweep (make benchmark)
    python benchmarks/attention.py --device cuda        # GPU, when one is available
    python benchmarks/attention.py --device cuda --dtype bfloat16 --attention causal \
        --methods fairseq_softmax,sdpa,leap,leap_fla --out DIR   # what device_speed.sh runs
    python benchmarks/attention.py --lengths 256,1024 --decode-positions 1,64 --repeats 2
    python benchmarks/attention.py --sections cutover   # only the cut-over sweep

Writes ``attention_<device>.{json,md,png}`` under ``--out`` (default benchmarks/results).
"""
import argparse
import json
import logging
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch
from fairseq.modules import MultiheadAttention
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from leapformer_fairseq.modules import LeaPMultiheadAttention
from leapformer_fairseq.modules.leap_multihead_attention import (
    BLOCK_SIZE,
    SHORT_FORM_MAX_LENGTH,
)
from leapformer_fairseq.ops import (
    BACKEND_VARIABLE,
    STEP_BACKEND_VARIABLE,
    select_backend,
    select_step_backend,
)
from leapformer_fairseq.profiling import peak_rss_increase

ROOT = Path(__file__).resolve().parents[1]

METHODS = ("fairseq_softmax", "fairseq_softmax_weights", "sdpa", "linear", "cosformer", "leap",
           "leap_hedgehog")
# LeaP through a backend of the causal sums other than ``torch`` (``ops.BACKENDS``): CUDA only,
# measured when named in --methods
BACKEND_METHODS = {"leap_fla": "fla"}
# LeaP's decode step through the eager ops (``LEAPFORMER_STEP_BACKEND=torch``), beside the
# default step (the fused op where it builds): decode section only
STEP_BACKEND_METHODS = {"leap_eager": "torch"}
# LeaP with compile_feature_map (the feature map through torch.compile, compiled in each child's
# warm-up pass): measured when named in --methods
COMPILED_METHODS = ("leap_compiled",)
# what --methods accepts beyond METHODS, in report order
OPTIONAL_METHODS = (*BACKEND_METHODS, *COMPILED_METHODS)
DECODE_METHODS = ("fairseq_softmax", "leap", "leap_hedgehog", "leap_eager")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTIONS = {"causal": True, "bidirectional": False}
BASELINE = "fairseq_softmax"
DECODE_RUN = 10  # timed decode steps of one method in a row (measure_decode)
# untimed steps before each run: after softmax's step at 8,192 positions (16 MiB of cache read,
# 32 MiB written) the next method's steps take about 10 to return to their own speed
DECODE_WARMUP = 10
SECTIONS = ("train", "decode", "cutover")
# the forms the cut-over sweep compares, as the module's short_form_max_length (None: the
# length measured, so the short form runs)
CUTOVER_FORMS = {"causal short": None, "causal blockwise": 0}
LABELS = {
    "fairseq_softmax": "fairseq softmax (need_weights=False)",
    "fairseq_softmax_weights": "fairseq softmax (need_weights=True)",
    "sdpa": "torch SDPA",
    "linear": "linear",
    "cosformer": "cosFormer",
    "leap": "LeaP",
    "leap_hedgehog": "LeaP over Hedgehog's features",
    "leap_fla": "LeaP, fla-core's kernel (fla backend)",
    "leap_eager": "LeaP, eager step (LEAPFORMER_STEP_BACKEND=torch)",
    "leap_compiled": "LeaP, feature map compiled (compile_feature_map)",
}


class SDPAAttention(nn.Module):
    """Projections around ``torch.nn.functional.scaled_dot_product_attention``; T x B x C."""

    def __init__(self, embed_dim: int, num_heads: int, causal: bool):
        super().__init__()
        self.num_heads, self.causal = num_heads, causal
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length, bsz, embed_dim = x.shape
        q, k, v = (
            t.reshape(length, bsz, self.num_heads, -1).permute(1, 2, 0, 3)
            for t in self.qkv(x).chunk(3, dim=-1)
        )
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(out.permute(2, 0, 1, 3).reshape(length, bsz, embed_dim))


def build_step(method: str, causal: bool, args, x: torch.Tensor,
               short_form_max_length: Optional[int] = None) -> Callable[[], torch.Tensor]:
    """A closure running one forward pass of ``method`` on ``x`` (T x B x C); LeaP's causal
    short form up to ``short_form_max_length`` rows (``None``: the module's default)."""
    placement = {"device": x.device, "dtype": x.dtype}
    if method == "sdpa":
        module = SDPAAttention(args.embed_dim, args.heads, causal).to(**placement)
        if x.device.type != "cuda":
            return lambda: module(x)

        def flash() -> torch.Tensor:  # FlashAttention, or an error: no other kernel silently
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return module(x)
        return flash
    if method.startswith("fairseq_softmax"):
        module = MultiheadAttention(args.embed_dim, args.heads, self_attention=True).to(**placement)
        need_weights = method == "fairseq_softmax_weights"
        mask = None
        if causal:
            length = x.size(0)
            future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
            mask = torch.zeros(length, length, **placement).masked_fill(future, float("-inf"))
        return lambda: module(x, x, x, attn_mask=mask, need_weights=need_weights)[0]
    module = LeaPMultiheadAttention(
        args.embed_dim, args.heads, self_attention=True, causal=causal,
        chunk_size=args.chunk_size, block_size=args.block_size,
        short_form_max_length=short_form_max_length,
        cosformer_max_positions=max(1024, x.size(0)),  # cosFormer's M covers every position
        compile_feature_map=method in COMPILED_METHODS,
        **attention_options(method),
    ).to(**placement)
    backend = BACKEND_METHODS.get(method)

    def forward() -> torch.Tensor:
        with environment(BACKEND_VARIABLE, backend):
            return module(x, x, x, need_weights=False)[0]
    return forward


def attention_options(method: str) -> Dict[str, str]:
    """``LeaPMultiheadAttention``'s type and feature map of a method (``leap_hedgehog``: LeaP
    over Hedgehog's features; the others, backend and compiled methods included, on ReLU
    features)."""
    attn_type, _, feature_map = method.partition("_")
    if method in (*BACKEND_METHODS, *STEP_BACKEND_METHODS, *COMPILED_METHODS):
        feature_map = ""
    return {"attn_type": attn_type, "leap_feature_map": feature_map or "relu"}


@contextmanager
def environment(variable: str, value: Optional[str]) -> Iterator[None]:
    """``variable=value`` for the calls inside (unchanged for ``None``); the variable's earlier
    value afterwards."""
    if value is None:
        yield
        return
    previous = os.environ.get(variable)
    os.environ[variable] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[variable]
        else:
            os.environ[variable] = previous


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def forward_backward_pass(method: str, causal: bool, args, x: torch.Tensor,
                          short_form_max_length: Optional[int] = None) -> Callable[[], None]:
    """A closure running one forward+backward pass of ``method`` on ``x``."""
    torch.manual_seed(0)
    forward = build_step(method, causal, args, x, short_form_max_length)

    def forward_backward():
        forward().sum().backward()
        x.grad = None
        synchronize(args.device)

    return forward_backward


def measure_train(method: str, causal: bool, length: int, args) -> Dict:
    """Forward+backward: median time over ``repeats`` and peak memory of one pass."""
    torch.manual_seed(0)
    x = torch.randn(length, args.batch, args.embed_dim, device=args.device,
                    dtype=DTYPES[args.dtype], requires_grad=True)
    forward_backward = forward_backward_pass(method, causal, args, x)
    forward_backward()  # warm-up
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        forward_backward()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak, _ = peak_rss_increase(forward_backward)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        forward_backward()
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), "peak_bytes": peak}


def measure_cutover(length: int, batch: int, args) -> Dict:
    """Causal LeaP forward+backward in each form of ``CUTOVER_FORMS`` on the same batch, the
    forms alternating pass by pass; the minimum over ``cutover_rounds`` passes of each (the
    forms coincide up to the chunk size, which shows the noise left)."""
    torch.manual_seed(0)
    x = torch.randn(length, batch, args.embed_dim, device=args.device, dtype=DTYPES[args.dtype],
                    requires_grad=True)
    passes = {form: forward_backward_pass("leap", True, args, x,
                                          length if short is None else short)
              for form, short in CUTOVER_FORMS.items()}
    times: Dict[str, List[float]] = {form: [] for form in passes}
    for run in passes.values():  # warm-up
        run()
    for _ in range(args.cutover_rounds):
        for form, run in passes.items():
            start = time.perf_counter()
            run()
            times[form].append(time.perf_counter() - start)
    return {"time_s": {form: min(samples) for form, samples in times.items()}}


def measure_decode(methods: List[str], positions: List[int], args) -> List[Dict]:
    """Per-token decode time of each method at each position, and the bytes its incremental
    state holds.

    The methods are timed side by side in one process, in short runs of ``DECODE_RUN`` steps in
    an order shuffled every time (so a slow spell of a shared machine falls on every method
    alike), each run after ``DECODE_WARMUP`` untimed steps (so no method pays for the caches
    the previous method left: softmax's cache at 8,192 positions is 16 MiB), every step from a
    copy of the state at its position. A step time is the minimum over rounds of the median step.
    """
    torch.set_num_threads(args.decode_threads)
    device, embed_dim, dtype = args.device, args.embed_dim, DTYPES[args.dtype]
    modules = {}
    for method in methods:
        torch.manual_seed(0)
        if method == "fairseq_softmax":
            module = MultiheadAttention(embed_dim, args.heads, self_attention=True)
        else:
            module = LeaPMultiheadAttention(embed_dim, args.heads, self_attention=True,
                                            causal=True, **attention_options(method))
        modules[method] = module.to(device=device, dtype=dtype).eval()
    token = torch.randn(1, 1, embed_dim, device=device, dtype=dtype)
    step_backends = {}
    with torch.no_grad():
        for method in methods:
            if method != "fairseq_softmax":
                with environment(STEP_BACKEND_VARIABLE, STEP_BACKEND_METHODS.get(method)):
                    step_backends[method] = select_step_backend(torch.device(device), dtype)
    states, state_bytes = {}, {}
    order = random.Random(0)
    with torch.no_grad():
        for method, module in modules.items():
            for position in positions:  # a state holding ``position`` tokens
                state: Dict = {}
                prefix = torch.randn(position, 1, embed_dim, device=device, dtype=dtype)
                with environment(STEP_BACKEND_VARIABLE, STEP_BACKEND_METHODS.get(method)):
                    module(prefix, prefix, prefix, incremental_state=state, need_weights=False)
                buffer = module._get_input_buffer(state)
                states[method, position] = state
                state_bytes[method, position] = sum(t.numel() * t.element_size()
                                                    for t in buffer.values() if t is not None)
        rounds: Dict = {key: [] for key in states}
        for _ in range(args.decode_rounds):
            for position in positions:
                times: Dict[str, List[float]] = {method: [] for method in modules}
                for _ in range(max(1, args.decode_steps // DECODE_RUN)):
                    shuffled = list(modules)
                    order.shuffle(shuffled)
                    for method in shuffled:
                        with environment(STEP_BACKEND_VARIABLE, STEP_BACKEND_METHODS.get(method)):
                            for step in range(DECODE_WARMUP + DECODE_RUN):
                                step_state = {key: dict(value)
                                              for key, value in states[method, position].items()}
                                synchronize(device)
                                start = time.perf_counter()
                                modules[method](token, token, token,
                                                incremental_state=step_state, need_weights=False)
                                synchronize(device)
                                if step >= DECODE_WARMUP:
                                    times[method].append(time.perf_counter() - start)
                for method, samples in times.items():
                    rounds[method, position].append(statistics.median(samples))
    return [{"method": method, "position": position,
             "step_time_s": min(rounds[method, position]),
             "state_bytes": state_bytes[method, position],
             **({"step_backend": step_backends[method]} if method in step_backends else {})}
            for method in methods for position in positions]


def run_task(task: Dict, args) -> Dict:
    """One measurement: on the CPU in a child process (:func:`run_child`), on CUDA in this
    process (peak memory is the allocator's, reset per measurement; a child would pay CUDA's
    start-up each time), an out-of-memory recorded as such."""
    if args.device == "cpu":
        return run_child(task, args)
    try:
        return measure(task, args)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        torch.cuda.empty_cache()


def run_child(task: Dict, args) -> Dict:
    """Run one measurement in a fresh process under an address-space limit."""
    command = [sys.executable, __file__, "--child", json.dumps(task)] + args.passthrough
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.child_timeout}s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["exit code %d" % done.returncode])[-1]
        return {"error": "out of memory" if "alloc" in tail.lower() else tail[-200:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(task: Dict, args) -> Dict:
    """The measurement ``task`` describes (its ``kind``: train, cutover or decode)."""
    if task["kind"] == "train":
        return measure_train(task["method"], task["causal"], task["length"], args)
    if task["kind"] == "cutover":
        return measure_cutover(task["length"], task["batch"], args)
    return {"rows": measure_decode(task["methods"], task["positions"], args)}


def child_main(task: Dict, args) -> None:
    if args.device == "cpu" and args.memory_limit_gb > 0:
        limit = int(args.memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps(measure(task, args)))


def machine_description(device: str) -> Dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def invocation() -> Dict[str, str]:
    """This script's command line (``python benchmarks/NAME.py ...``, from the repository root)
    and the repository's short commit, ``-dirty`` when tracked files outside
    ``benchmarks/results`` (which runs rewrite) differ from it: the code that ran is then not
    the commit's."""
    root = Path(__file__).resolve().parents[1]
    script = Path(sys.argv[0]).absolute().relative_to(root)

    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=root, capture_output=True,
                              text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      ":(exclude)benchmarks/results"):
        commit += "-dirty"
    return {"command": "python " + shlex.join([str(script), *sys.argv[1:]]), "commit": commit}


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    return None if not numerator or not denominator else numerator / denominator


def cutover_length(cutover: List[Dict], chunk_size: int) -> Dict:
    """The noise (the largest relative difference between the two forms at lengths up to
    ``chunk_size``, where they are the same computation) and the cut-over: the largest length at
    and below which the short form was never slower than blockwise by more than the noise."""
    ratios = {row["length"]: row["time_s"]["causal short"] / row["time_s"]["causal blockwise"]
              for row in cutover if row.get("time_s")}
    noise = max((abs(r - 1) for n, r in ratios.items() if n <= chunk_size), default=0.0)
    best = 0
    for length in sorted(ratios):
        if ratios[length] > 1 + noise:
            break
        best = length
    return {"length": best, "noise": noise}


def summarise(train: List[Dict], decode: List[Dict], lengths: List[int],
              cutover: List[Dict], chunk_size: int) -> Dict:
    """LeaP's ratios against the baselines at every length both finished, decode ratios, and the
    short form's cut-over."""
    def lookup(method, causal, length, key):
        for row in train:
            if (row["method"], row["causal"], row["length"]) == (method, causal, length):
                return row.get(key)
        return None

    summary: Dict = {}
    for causal in (True, False):
        by_length = {}
        for n in lengths:
            if not (lookup(BASELINE, causal, n, "time_s") and lookup("leap", causal, n, "time_s")):
                continue
            leap_time = lookup("leap", causal, n, "time_s")
            leap_peak = lookup("leap", causal, n, "peak_bytes")
            by_length[str(n)] = {
                "leap_speedup_vs_fairseq_softmax":
                    ratio(lookup(BASELINE, causal, n, "time_s"), leap_time),
                "leap_memory_saving_vs_fairseq_softmax":
                    ratio(lookup(BASELINE, causal, n, "peak_bytes"), leap_peak),
                "leap_memory_saving_vs_fairseq_softmax_weights":
                    ratio(lookup("fairseq_softmax_weights", causal, n, "peak_bytes"), leap_peak),
                "leap_speedup_vs_sdpa": ratio(lookup("sdpa", causal, n, "time_s"), leap_time),
                "leap_time_vs_cosformer": ratio(leap_time,
                                                lookup("cosformer", causal, n, "time_s")),
            }
        if by_length:
            name = "causal" if causal else "bidirectional"
            summary[name] = {"longest_length": max(by_length, key=int), "by_length": by_length}
    leap_steps = {row["position"]: row["step_time_s"] for row in decode
                  if row["method"] == "leap" and "step_time_s" in row}
    if leap_steps:
        first, last = min(leap_steps), max(leap_steps)
        summary["decode"] = {
            "leap_step_time_ratio": {
                f"{p}_vs_{first}": ratio(leap_steps[p], leap_steps[first]) for p in leap_steps
            },
            "last_position": last,
        }
        if 64 in leap_steps and 4096 in leap_steps:
            summary["decode"]["leap_step_time_ratio_4096_vs_64"] = ratio(leap_steps[4096],
                                                                         leap_steps[64])
        softmax_steps = {row["position"]: row["step_time_s"] for row in decode
                         if row["method"] == BASELINE and "step_time_s" in row}
        summary["decode"]["leap_slowest_vs_fastest"] = ratio(max(leap_steps.values()),
                                                             min(leap_steps.values()))
        summary["decode"]["leap_vs_softmax"] = {
            str(p): ratio(leap_steps[p], softmax_steps.get(p)) for p in leap_steps}
    if cutover:
        summary["cutover"] = cutover_length(cutover, chunk_size)
    return summary


def measured_attentions(report: Dict) -> List[bool]:
    """``causal`` of the forward+backward sections ``report`` measured (both before
    ``--attention`` existed)."""
    return [ATTENTIONS[name] for name in report["config"].get("attention", ATTENTIONS)]


def decode_methods(report: Dict) -> List[str]:
    """The decode methods ``report`` measured, in ``DECODE_METHODS`` order."""
    return [m for m in DECODE_METHODS if any(r["method"] == m for r in report["decode"])]


def fmt_time(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def fmt_mib(num_bytes: Optional[float]) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:.1f}"


def markdown(report: Dict) -> str:
    lines = [f"# Attention benchmark ({report['device']})", "",
             *[f"Command ({section}): `{command}`" for section, command in
               report["commands"].items()], "",
             "Machine: " + ", ".join(f"{k}={v}" for k, v in report["machine"].items()), "",
             "Model: `LeaPMultiheadAttention` (LeaP on ReLU features, its default"
             + ("; `leap_hedgehog`: LeaP over Hedgehog's features"
                if "leap_hedgehog" in report["config"].get("methods", ()) else "")
             + "), d_model "
             f"{report['config']['embed_dim']}, {report['config']['heads']} heads, "
             f"batch {report['config']['batch']}, "
             f"{report['config'].get('dtype', 'float32')}, chunk {report['config']['chunk_size']}, "
             f"block {report['config']['block_size']}; "
             f"time is the minimum over {report['config'].get('rounds', 1)} rounds (each "
             "configuration measured once per round, round-robin) of the median of "
             f"{report['config']['repeats']} forward+backward passes; memory is the largest "
             "peak rise during one pass "
             + ("(RSS)." if report["device"] == "cpu" else "(CUDA allocator); torch SDPA "
                "runs FlashAttention's kernel (or fails)."), ""]
    lengths = report["config"]["lengths"]
    for causal in measured_attentions(report):
        for key, title, fmt in (("time_s", "forward+backward time (ms)", fmt_time),
                                ("peak_bytes", "peak memory (MiB)", fmt_mib)):
            lines += [f"## {'Causal' if causal else 'Bidirectional'}: {title}", "",
                      "| method | " + " | ".join(str(n) for n in lengths) + " |",
                      "|---|" + "---|" * len(lengths)]
            for method in report["config"]["methods"]:
                cells = []
                for n in lengths:
                    row = next(r for r in report["train"] if (r["method"], r["causal"],
                                                               r["length"]) == (method, causal, n))
                    cells.append(fmt(row.get(key)) if "error" not in row else row["error"])
                lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
            lines.append("")
    positions = report["config"]["decode_positions"]
    lines += ["## Decode: time per token (ms) and state size (KiB)", "",
              "| method | " + " | ".join(str(p) for p in positions) + " |",
              "|---|" + "---|" * len(positions)]
    for method in decode_methods(report):
        rows = [next(r for r in report["decode"] if (r["method"], r["position"]) == (method, p))
                for p in positions]
        lines.append(f"| {LABELS[method]} step | "
                     + " | ".join(fmt_time(r.get("step_time_s")) for r in rows) + " |")
        lines.append(f"| {LABELS[method]} state | "
                     + " | ".join("-" if "state_bytes" not in r
                                  else f"{r['state_bytes'] / 1024:.0f}" for r in rows) + " |")
    backends = {r["method"]: r["step_backend"] for r in report["decode"] if "step_backend" in r}
    if backends:
        lines += ["", "LeaP's decode step ran on (`LEAPFORMER_STEP_BACKEND`; `cpp`: the fused "
                  "op, `torch`: the eager ops): "
                  + ", ".join(f"{method} {backend}" for method, backend in backends.items())]
    lines += ["", "## Summary: LeaP against the others, ratios measured in this run", "",
              "| attention | length | speed-up vs fairseq softmax | memory saving vs fairseq "
              "softmax (fused) | memory saving vs fairseq softmax (weights) | speed-up vs SDPA "
              "| time vs cosFormer |",
              "|---|---|---|---|---|---|---|"]
    for name in ("causal", "bidirectional"):
        for length, row in report["summary"].get(name, {}).get("by_length", {}).items():
            cells = [row[key] for key in (
                "leap_speedup_vs_fairseq_softmax", "leap_memory_saving_vs_fairseq_softmax",
                "leap_memory_saving_vs_fairseq_softmax_weights", "leap_speedup_vs_sdpa",
                "leap_time_vs_cosformer")]
            lines.append(f"| {name} | {length} | "
                         + " | ".join("-" if c is None else f"{c:.2f}x" for c in cells) + " |")
    decode = report["summary"].get("decode")
    if decode:
        lines += ["", "LeaP decode step time relative to the first position: "
                  + ", ".join(f"{k.split('_')[0]}: {v:.2f}x"
                              for k, v in decode["leap_step_time_ratio"].items())]
        if "leap_vs_softmax" in decode:
            lines += ["", f"LeaP's slowest over fastest step: "
                      f"{decode['leap_slowest_vs_fastest']:.2f}; LeaP's step over softmax's: "
                      + ", ".join(f"{p}: {'-' if v is None else f'{v:.2f}x'}"
                                  for p, v in decode["leap_vs_softmax"].items())]
    if report.get("cutover"):
        lines += cutover_markdown(report)
    lines.append("")
    return "\n".join(lines)


def cutover_markdown(report: Dict) -> List[str]:
    """The cut-over table: causal LeaP forward+backward, short form against blockwise."""
    config = report["config"]
    lines = ["", "## Cut-over: causal LeaP, short form against blockwise", "",
             f"Command: `{report['commands']['cutover']}`", "",
             f"Forward+backward of one causal LeaP self-attention, batch = "
             f"{config['cutover_tokens']} // length sentences (a batch of max-tokens "
             f"{config['cutover_tokens']}); both forms in one process on the same batch, "
             f"alternating, the minimum of {config['cutover_rounds']} passes each; short: one "
             f"masked L x L chunk; blockwise: chunk {config['chunk_size']}, block "
             f"{config['block_size']}. Up to the chunk size the two forms are the same "
             "computation, so their ratio there shows the noise left.", "",
             "| length | batch | short (ms) | blockwise (ms) | short / blockwise |",
             "|---|---|---|---|---|"]
    for row in report["cutover"]:
        times = row.get("time_s") or {}
        if not times:
            lines.append(f"| {row['length']} | {row['batch']} | {row['error']} | | |")
            continue
        short, blockwise = times["causal short"], times["causal blockwise"]
        lines.append(f"| {row['length']} | {row['batch']} | {fmt_time(short)} | "
                     f"{fmt_time(blockwise)} | {short / blockwise:.2f} |")
    chosen = SHORT_FORM_MAX_LENGTH.get(report["device"])
    cutover = report["summary"]["cutover"]
    lines += ["", f"Noise (the largest difference up to the chunk size): "
              f"{100 * cutover['noise']:.1f}%. The short form is never slower by more than that "
              f"up to length {cutover['length']}; `SHORT_FORM_MAX_LENGTH` of the module for "
              f"{report['device']}: {'not set' if chosen is None else chosen}."]
    return lines


def plot(report: Dict, path: Path) -> None:
    import matplotlib
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cutover = report.get("cutover") or []
    panels = [(causal, key, scale, f"{'causal' if causal else 'bidirectional'} {title}")
              for key, scale, title in (("time_s", 1e3, "fwd+bwd (ms)"),
                                        ("peak_bytes", 2**-20, "peak memory (MiB)"))
              for causal in measured_attentions(report)]
    columns = len(panels) + (2 if cutover else 1)
    fig, axes = plt.subplots(1, columns, figsize=(5.2 * columns, 5))
    for axis, (causal, key, scale, title) in zip(axes, panels):
        for method in report["config"]["methods"]:
            rows = [r for r in report["train"] if r["method"] == method and r["causal"] == causal
                    and r.get(key) is not None]
            axis.plot([r["length"] for r in rows], [r[key] * scale for r in rows], marker="o",
                      label=LABELS[method])
        axis.set(xscale="log", yscale="log", xlabel="sequence length", title=title)
    axes[0].legend(fontsize=8)
    for method in decode_methods(report):
        rows = [r for r in report["decode"] if r["method"] == method and "step_time_s" in r]
        axes[len(panels)].plot([r["position"] for r in rows],
                               [r["step_time_s"] * 1e3 for r in rows], marker="o",
                               label=LABELS[method])
    axes[len(panels)].set(xscale="log", yscale="log", xlabel="position",
                          title="decode step (ms)")
    axes[len(panels)].legend(fontsize=8)
    if cutover:
        rows = [r for r in cutover if r.get("time_s")]
        for form in CUTOVER_FORMS:
            axes[-1].plot([r["length"] for r in rows], [r["time_s"][form] * 1e3 for r in rows],
                          marker="o", label=f"LeaP {form}")
        axes[-1].set(xlabel="sentence length (batch = tokens / length)",
                    title="causal LeaP fwd+bwd per batch (ms)")
        axes[-1].legend(fontsize=8)
    hardware = report["machine"].get("gpu") or report["machine"]["cpu"]
    fig.suptitle(f"Attention benchmark on {report['device']}: {hardware}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lengths", default="256,512,1024,2048,4096,8192,16384")
    parser.add_argument("--decode-positions", default="1,16,64,256,1024,4096,8192")
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="dtype of the inputs and modules (the linear forms still sum in "
                             "float32)")
    parser.add_argument("--attention", default=",".join(ATTENTIONS),
                        help="forward+backward of which, of " + ",".join(ATTENTIONS))
    parser.add_argument("--chunk-size", type=int, default=32,
                        help="chunk of the causal chunked form (the module's default)")
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE,
                        help="rows per recomputed block of causal linear attention")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of " + ",".join(METHODS) + "; also "
                             + ",".join(BACKEND_METHODS) + " (CUDA) and "
                             + ",".join(COMPILED_METHODS) + " (needs a C++ compiler on a CPU, "
                             "Triton on a GPU)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed forward+backward passes per child; their median is kept")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times every training configuration is measured, round-robin over "
                             "all of them; the minimum over rounds is kept")
    parser.add_argument("--decode-steps", type=int, default=50,
                        help="timed decode steps of each method per position and round")
    parser.add_argument("--decode-rounds", type=int, default=20,
                        help="rounds of decode steps; the minimum of their medians is kept")
    parser.add_argument("--decode-threads", type=int, default=1,
                        help="torch threads while timing single-token decode steps")
    parser.add_argument("--cutover-lengths", default="16,32,48,64,96,128,192,256,384,512",
                        help="sentence lengths of the cut-over sweep")
    parser.add_argument("--cutover-tokens", type=int, default=4096,
                        help="tokens per batch in the cut-over sweep (batch = tokens // length)")
    parser.add_argument("--cutover-rounds", type=int, default=9,
                        help="alternating passes of both forms per length; the minimum is kept")
    parser.add_argument("--memory-limit-gb", type=float, default=18.0,
                        help="address-space limit of each CPU child (0: none)")
    parser.add_argument("--child-timeout", type=int, default=900)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="what to measure, of " + ",".join(SECTIONS) + "; a section left "
                             "out keeps its rows (and their command) from the existing report "
                             "in --out")
    parser.add_argument("--render", metavar="JSON",
                        help="re-write the summary, Markdown and PNG of a saved run; measure "
                             "nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.repeats, args.rounds) < 1:
        parser.error("--repeats and --rounds must be >= 1")
    unknown = set(args.methods.split(",")) - set(METHODS) - set(OPTIONAL_METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from "
                     f"{list(METHODS) + list(OPTIONAL_METHODS)}")
    for method in sorted(set(args.methods.split(",")) & set(BACKEND_METHODS)):
        try:  # the library's own checks: CUDA, the dtype, the package
            with environment(BACKEND_VARIABLE, BACKEND_METHODS[method]):
                select_backend(torch.device(args.device), DTYPES[args.dtype])
        except ValueError as error:
            parser.error(f"--methods {method}: {error}")
    attentions = args.attention.split(",")
    if not attentions or not set(attentions) <= set(ATTENTIONS):
        parser.error(f"--attention: choose from {','.join(ATTENTIONS)}, got {args.attention!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    args.passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(json.loads(args.child), args)
        return
    if args.render:
        path = Path(args.render)
        if not path.is_file():
            raise SystemExit(f"--render: no such file {path}")
        write_report(json.loads(path.read_text()), path)
        return
    lengths = [int(n) for n in args.lengths.split(",")]
    attentions = [name for name in ATTENTIONS if name in args.attention.split(",")]
    positions = [int(p) for p in args.decode_positions.split(",")]
    sections = set(args.sections.split(","))
    if not sections or not sections <= set(SECTIONS):
        raise SystemExit(f"--sections: choose from {','.join(SECTIONS)}, got {args.sections!r}")
    methods = [m for m in (*METHODS, *OPTIONAL_METHODS) if m in args.methods.split(",")]
    json_path = Path(args.out) / f"attention_{args.device}.json"
    command = " ".join(["python", "benchmarks/attention.py", *args.passthrough])
    report = {
        "device": args.device,
        "commands": {},
        "machine": machine_description(args.device),
        "config": {"embed_dim": args.embed_dim, "heads": args.heads, "batch": args.batch,
                   "dtype": args.dtype, "chunk_size": args.chunk_size,
                   "block_size": args.block_size},
        "train": [],
        "decode": [],
        "cutover": [],
    }
    if sections != set(SECTIONS):
        if not json_path.is_file():
            raise SystemExit(f"--sections {args.sections}: no earlier report {json_path} to "
                             "take the other sections from")
        previous = json.loads(json_path.read_text())
        if previous["machine"] != report["machine"]:
            raise SystemExit(f"--sections {args.sections}: {json_path} was measured on another "
                             f"machine ({previous['machine']}, here {report['machine']}); "
                             "run every section here, or write elsewhere (--out)")
        if previous["config"].get("dtype", "float32") != args.dtype:
            raise SystemExit(f"--sections {args.sections}: {json_path} was measured in "
                             f"{previous['config'].get('dtype', 'float32')}, not --dtype "
                             f"{args.dtype}; run every section, or write elsewhere (--out)")
        report.update({key: previous[key] for key in ("train", "decode", "cutover", "commands")
                       if key in previous})
        report["config"].update({key: previous["config"][key] for key in (
            "attention", "lengths", "methods", "repeats", "rounds", "decode_positions",
            "decode_steps", "decode_rounds", "decode_threads", "cutover_lengths", "cutover_tokens",
            "cutover_rounds") if key in previous["config"]})
    if "train" in sections:
        report["commands"]["train"] = command
        report["config"].update({"attention": attentions, "lengths": lengths,
                                 "methods": methods, "repeats": args.repeats,
                                 "rounds": args.rounds})
        report["train"] = measure_train_section(methods, attentions, lengths, args)
    if "decode" in sections:
        report["commands"]["decode"] = command
        report["config"].update({"decode_positions": positions,
                                 "decode_steps": args.decode_steps,
                                 "decode_rounds": args.decode_rounds,
                                 "decode_threads": args.decode_threads})
        report["decode"] = measure_decode_section(positions, args)
    if "cutover" in sections:
        report["commands"]["cutover"] = command
        cutover_lengths = [int(n) for n in args.cutover_lengths.split(",")]
        report["config"].update({"cutover_lengths": cutover_lengths,
                                 "cutover_tokens": args.cutover_tokens,
                                 "cutover_rounds": args.cutover_rounds})
        report["cutover"] = measure_cutover_section(cutover_lengths, args)
    write_report(report, json_path)


def measure_cutover_section(lengths: List[int], args) -> List[Dict]:
    """Causal LeaP forward+backward in each form of ``CUTOVER_FORMS`` at each length, with a
    batch of ``--cutover-tokens`` tokens."""
    cutover = []
    for length in lengths:
        task = {"kind": "cutover", "length": length,
                "batch": max(1, args.cutover_tokens // length)}
        result = run_task(task, args)
        cutover.append({**task, **result})
        times = result.get("time_s") or {}
        print(f"[cutover] n={length:5d} batch {task['batch']:4d} "
              + "  ".join(f"{form} {fmt_time(t)} ms" for form, t in times.items())
              + f" {result.get('error', '')}", flush=True)
    return cutover


def measure_train_section(methods: List[str], attentions: List[str], lengths: List[int],
                          args) -> List[Dict]:
    """Every (attention, method, length) (:func:`run_task`), ``--rounds`` times, each round over
    all of them in the same order: a configuration's time is the minimum over rounds of its
    median pass (a slow spell of this shared machine then slows one round of every method, not
    one method's only measurement), its memory the largest peak. A configuration that failed
    (out of memory, time-out) is not run again."""
    tasks = [{"kind": "train", "method": method, "causal": ATTENTIONS[name], "length": length}
             for name in attentions for method in methods for length in lengths]
    results: List[List[Dict]] = [[] for _ in tasks]
    for round_index in range(1, args.rounds + 1):
        for task, runs in zip(tasks, results):
            if any("error" in run for run in runs):
                continue
            result = run_task(task, args)
            runs.append(result)
            print(f"[train {round_index}/{args.rounds}] "
                  f"{'causal' if task['causal'] else 'bidir '} {task['method']:24s} "
                  f"n={task['length']:6d} time {fmt_time(result.get('time_s'))} ms  "
                  f"peak {fmt_mib(result.get('peak_bytes'))} MiB {result.get('error', '')}",
                  flush=True)
    train = []
    for task, runs in zip(tasks, results):
        done = [run for run in runs if "error" not in run]
        if not done:
            train.append({**task, **runs[-1]})
            continue
        train.append({**task, "time_s": min(run["time_s"] for run in done),
                      "peak_bytes": max(run["peak_bytes"] for run in done),
                      "rounds": len(done)})
    return train


def measure_decode_section(positions: List[int], args) -> List[Dict]:
    """Every method of ``DECODE_METHODS`` at every position, side by side in one child."""
    task = {"kind": "decode", "methods": list(DECODE_METHODS), "positions": positions}
    result = run_task(task, args)
    decode = result.get("rows") or [{"method": method, "position": p, "error": result["error"]}
                                    for method in DECODE_METHODS for p in positions]
    for row in decode:
        print(f"[decode] {row['method']:16s} position {row['position']:5d} step "
              f"{fmt_time(row.get('step_time_s'))} ms  state "
              f"{row.get('state_bytes', '-')} B {row.get('error', '')}", flush=True)
    return decode


def write_report(report: Dict, json_path: Path) -> None:
    """Add the summary, then write JSON, Markdown and PNG side by side."""
    report["summary"] = summarise(report["train"], report["decode"], report["config"]["lengths"],
                                  report.get("cutover", []), report["config"]["chunk_size"])
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    json_path.with_suffix(".md").write_text(table)
    plot(report, json_path.with_suffix(".png"))
    print(table)
    print(f"wrote {json_path}, {json_path.with_suffix('.md')} and {json_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
