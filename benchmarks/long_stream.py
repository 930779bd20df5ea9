"""Hour-long streams: memory, compute and state of the speech stream over 60 minutes of audio,
and its last minute against a float64 offline recomputation of the whole hour.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/long_stream.py            # 60 minutes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/long_stream.py --minutes 3 --interval 15

Audio: "talks" of English sentences (the English side of ``data/gettext-mt/en-de.train.tsv``)
spoken by espeak-ng (``leapformer_fairseq.recipes.tts.synthesise``: 16 kHz mono, int16 scale;
voice and speed drawn per sentence from ``scripts/make_tts_corpus.py``'s defaults). To keep
synthesis cheap a pool of ``--pool`` sentences is synthesised once and the stream is built by
drawing from the pool (seeded) with a silence of 0.3-1.2 s between sentences and 2-5 s between
talks of 8-12 sentences, until ``--minutes`` of audio; the same sentence audio therefore recurs
(stated in the outputs).

Model: a ``leapformer_s2t_waitk_small`` LeaP model (d 256, 6 encoder layers, 4 heads, FFN 1024;
LeaP on ReLU features),
either ``--checkpoint`` (with the CMVN of its data config) or, by default, seeded random weights
built in-process as ``tests/test_s2t_models.py`` builds its models (wait-3, 9 frames per unit,
no dropout), with a global CMVN computed from the fbank of the sentence pool.

Stream: ``model.start_stream(cmvn=...)`` and ``push_audio`` in ``--piece-ms`` pieces (200 ms),
then ``finish_source``. Encoder only: the decoder is never run (over an hour its target
positions would run out, and wait-k decoding of random weights means nothing). A stream that is
never asked to ``predict`` keeps every encoder state in ``stream.pending`` for the decoder
(1 KiB per 40 ms frame, 92 MB an hour, re-copied by ``torch.cat`` at every push); the benchmark
plays the decoder's part by taking the new encoder states out of ``stream.pending`` after each
push (as ``predict`` does when it hands them to the cross-attention) and keeps only those of the
last minute, plus the first second of every interval, for the comparison.

Every ``--interval`` seconds of audio (60) it samples:
- compute: CPU time of the benchmark thread (``time.thread_time``) spent in each ``push_audio``
  (fbank, CMVN, subsampler, encoder), per second of audio; torch runs on one thread. The machine
  is shared, so wall-clock times are noisy and are not used. Even CPU time rises while other work
  contends for the cores (caches, SMT), so after every 4th push the same piece is also pushed
  into a *reference* stream, restarted every interval (so always young: at most one interval
  long), and timed the same way: the compute bar compares, per window, the median push divided
  by the median reference push (contention-normalised); the raw median and the total CPU time
  per second of audio are reported too;
- RSS: the current resident set (``/proc/self/statm``) after ``gc.collect`` and
  ``malloc_trim(0)``;
- the stream's state: ``stream.encoder_state`` walked recursively (dicts, lists, tuples, object
  attributes), every tensor counted, no key left out: tensor bytes (numel x element size), bytes of
  the distinct storages behind them (a view can keep a larger storage alive), tensors and entries;
  also per entry name (layer ids folded into ``*``) to tell which entry grows;
- the model's own tensors (parameters, buffers, and tensor attributes of modules, e.g. a cached
  positional table), since a stream can also grow memory held by the model.

Then the model is converted to float64 and the encoder's parallel ``forward`` runs on the fbank
of the whole stream (``leapformer_fairseq.audio.fbank``, float32 like the stream's, then CMVN and
float64; its peak RSS is reported); the last minute of streamed (float32) encoder states is
compared with it.

Bars (windows scale with ``--minutes``: for 60 they are exactly those below), checked and printed
PASS/FAIL:
1. no NaN or inf in any streamed or offline encoder state;
2. RSS at minute 60 minus RSS at minute 5 <= 20 MB;
3. compute per second of audio in minutes 50-60 within 10% of minutes 5-10 (median push CPU
   time x pushes per second, normalised by the reference stream's median push in each window);
4. max |float32 stream - float64 offline| over the last minute <= the bound of
   :func:`error_bound`, fixed before the first run.

Options:
  --minutes M       minutes of audio (default 60)
  --interval S      seconds of audio between samples (default 60; at most 5 x --minutes, so
                    that minute M/12, where the bars' windows start, is sampled)
  --piece-ms MS     size of each push_audio piece in ms (default 200)
  --pool N          sentences synthesised for the pool (default 200)
  --jobs J          espeak-ng processes in parallel (default 2)
  --checkpoint PT   a trained leapformer_s2t_waitk checkpoint (default: seeded random weights)
  --data-dir DIR    its data directory (config, vocabulary, CMVN); default: the checkpoint's
  --config-yaml Y   data config inside --data-dir (default config_st.yaml)
  --seed N          model weights, sentence choice, voices, pauses (default 1)
  --out DIR         writes DIR/long_stream_cpu.{json,md,png} (default benchmarks/results)
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Dict, List, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

ARCH = "leapformer_s2t_waitk_small"
SAMPLE_RATE = 16000
FRAME_SECONDS = 0.04  # one encoder state per 40 ms (two stride-2 layers over 10 ms frames)
RSS_BAR_MB = 20.0
COMPUTE_BAR = 0.10
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
BOUND_FACTOR = 10.0
REFERENCE_EVERY = 4  # a reference push after every 4th push of the long stream
REFERENCE_WARMUP = 3  # reference pushes not timed after each restart
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def error_bound(layers: int, frames: int, scale: float) -> float:
    """Bound on max |float32 stream - float64 offline| over the last minute, fixed before the
    first run.

    Every per-frame operation (fbank batching, projections, LeaP MLPs, FFN, layer norms) has a
    float32 rounding error of a few eps relative to its scale, local to the frame. What grows
    with the stream is the recurrent state of each layer's causal self-attention,
    ``S = sum_j phi(k_j)^T v_j`` and ``z = sum_j phi(k_j)``, accumulated in float32 over every
    frame so far: with round-to-nearest the rounding errors of n additions are independent and
    their sum grows like a random walk, a relative error of about ``eps * sqrt(n)`` (worst case
    ``eps * n``, which is not what happens in practice). The output ``phi(q) S / phi(q) z`` is a
    ratio of two such sums, and a pre-norm layer passes the error of the layers below on about
    unchanged (residual) while adding its own, independent one: after ``layers`` layers about
    ``eps * sqrt(layers * n)`` relative to the residual stream, i.e. in units of the final layer
    norm's output, whose scale is the RMS of the offline output. The maximum over the last
    minute's 1,500 x 256 elements is about 5 standard deviations of the typical element error;
    with a factor 2 for the ratio of two sums, the bound is

        10 * eps32 * sqrt(layers * frames) * rms(offline output of the last minute)

    (eps32 = 1.19e-7; for 6 layers and 90,000 frames of an hour: 8.8e-4 x rms, about 1e-3).
    """
    return BOUND_FACTOR * FLOAT32_EPS * math.sqrt(layers * frames) * scale


# ------------------------------------------------------------------------------- machine
def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def code_version() -> str:
    """The commit of the imported ``leapformer_fairseq`` and whether its files differ from it."""
    import leapformer_fairseq

    package = Path(leapformer_fairseq.__file__).resolve().parent

    def git(*arguments):
        done = subprocess.run(["git", *arguments], cwd=package, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "?"

    changed = git("status", "--porcelain", "--", ".")
    return (f"leapformer_fairseq at commit {git('rev-parse', '--short=12', 'HEAD')}"
            f"{' with uncommitted changes' if changed else ' (no uncommitted changes)'}")


_libc = None


def current_rss_mb() -> float:
    """Resident set after a garbage collection and ``malloc_trim(0)`` (freed heap memory
    returned), in MB (10^6 bytes)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6")
    gc.collect()
    _libc.malloc_trim(0)
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 1e6


# ---------------------------------------------------------------------------- state size
class TensorCensus:
    """Tensors reachable from an object: count, numel bytes and distinct storage bytes, also
    per entry name."""

    def __init__(self):
        self.tensors = 0
        self.entries = 0
        self.tensor_bytes = 0
        self.storages: Dict[int, int] = {}
        self.by_entry: Dict[str, int] = {}
        self._seen = set()

    @property
    def storage_bytes(self) -> int:
        return sum(self.storages.values())

    def add(self, obj, name: str = "") -> None:
        if torch.is_tensor(obj):
            self.tensors += 1
            size = obj.numel() * obj.element_size()
            self.tensor_bytes += size
            storage = obj.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
            label = UUID.sub("*", name) or "."
            self.by_entry[label] = self.by_entry.get(label, 0) + size
            return
        if id(obj) in self._seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            return
        self._seen.add(id(obj))
        if isinstance(obj, dict):
            for key, value in obj.items():
                self.entries += 1
                self.add(value, f"{name}/{key}")
        elif isinstance(obj, (list, tuple)):
            for index, value in enumerate(obj):
                self.entries += 1
                self.add(value, f"{name}[{index}]" if not hasattr(obj, "_fields")
                         else f"{name}.{obj._fields[index]}")
        elif hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
            for key, value in vars(obj).items():
                self.entries += 1
                self.add(value, f"{name}.{key}")


def state_census(state: Dict) -> TensorCensus:
    census = TensorCensus()
    census.add(state)
    return census


def model_tensor_census(model: torch.nn.Module) -> TensorCensus:
    """Parameters, buffers and tensor attributes of every module (e.g. a positional table a
    module grows on demand)."""
    census = TensorCensus()
    for module_name, module in model.named_modules():
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers"):
                for name, tensor in value.items():
                    if tensor is not None:
                        census.add(tensor, f"{module_name}.{name}")
            elif torch.is_tensor(value):
                census.add(value, f"{module_name}.{key}")
    return census


# ---------------------------------------------------------------------------------- audio
def english_sentences(path: Path) -> List[str]:
    from leapformer_fairseq.recipes.common import read_tsv_pairs

    pairs = read_tsv_pairs(str(path), "train", "en", "de", "long_stream", "read")
    return [source for source, _ in pairs if 4 <= len(source.split()) <= 30]


def synthesise_pool(args) -> Tuple[List[np.ndarray], List[str]]:
    """``--pool`` sentences, each with a seeded voice and speed, as int16 arrays at 16 kHz."""
    from leapformer_fairseq.recipes import tts

    voices, speeds = tts.VOICES, tts.SPEEDS  # scripts/make_tts_corpus.py's defaults
    tts.check_voices(voices, "make_tts_corpus.py's default --voices")
    rng = random.Random(f"{args.seed}/pool")
    texts = rng.sample(english_sentences(ROOT / "data" / "gettext-mt" / "en-de.{split}.tsv"),
                       args.pool)
    jobs = [(text, rng.choice(voices), rng.choice(speeds), f"pool sentence {i}")
            for i, text in enumerate(texts)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        audio = list(pool.map(lambda job: tts.synthesise(*job), jobs))
    return audio, texts


def build_hour(pool: List[np.ndarray], seconds: float, seed: int) -> Tuple[np.ndarray, Dict]:
    """Talks drawn from the pool: silence of 0.3-1.2 s between sentences, 2-5 s between talks of
    8-12 sentences, cut at ``seconds``."""
    rng = random.Random(f"{seed}/talks")
    total = int(round(seconds * SAMPLE_RATE))
    audio = np.zeros(total, dtype=np.int16)
    position, sentences, talks, speech = 0, 0, 0, 0
    while position < total:
        talks += 1
        position += int(rng.uniform(2.0, 5.0) * SAMPLE_RATE) if talks > 1 else \
            int(0.5 * SAMPLE_RATE)
        for _ in range(rng.randint(8, 12)):
            if position >= total:
                break
            sentence = pool[rng.randrange(len(pool))][: total - position]
            audio[position:position + len(sentence)] = sentence
            position += len(sentence)
            speech += len(sentence)
            sentences += 1
            position += int(rng.uniform(0.3, 1.2) * SAMPLE_RATE)
    return audio, {"sentences_placed": sentences, "talks": talks,
                   "speech_fraction": speech / total}


# ---------------------------------------------------------------------------------- model
def random_model(seed: int):
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_CONFIG_REGISTRY

    from leapformer_fairseq.models import LeaPformerS2TWaitkModel

    torch.manual_seed(seed)
    dictionary = Dictionary()
    for i in range(100):
        dictionary.add_symbol(f"w{i}")
    args = argparse.Namespace(
        arch=ARCH, waitk_lagging=3, frames_per_unit=9, encoder_attn_type="leap",
        decoder_attn_type="leap", cross_attn_type="leap", leap_feature_map="relu", dropout=0.0,
        input_feat_per_channel=80,
        input_channels=1, max_source_positions=6000, max_target_positions=1024,
    )
    ARCH_CONFIG_REGISTRY[ARCH](args)
    model = LeaPformerS2TWaitkModel.build_model(args, SimpleNamespace(
        target_dictionary=dictionary))
    return model.eval()


def load_model(args, pool: List[np.ndarray]):
    """(model in eval mode, CMVN, description)."""
    from leapformer_fairseq.audio import GlobalCMVN, cmvn_statistics, fbank

    if args.checkpoint:
        from leapformer_fairseq.models.streaming import load_streaming_model

        model, task = load_streaming_model(args.checkpoint, args.data_dir,
                                           overrides={"config_yaml": args.config_yaml})
        if not hasattr(model.encoder, "forward_new_frames"):
            raise SystemExit(f"{args.checkpoint}: not a leapformer_s2t_waitk model")
        path = task.data_cfg.global_cmvn_stats_npz
        return model, GlobalCMVN.load(path) if path else None, f"checkpoint {args.checkpoint}"
    model = random_model(args.seed)
    features = [fbank(torch.from_numpy(a.astype(np.float32))).numpy() for a in pool]
    cmvn = GlobalCMVN(*cmvn_statistics(features))
    return model, cmvn, (f"{ARCH} (LeaP on ReLU features), seeded random weights (seed "
                         f"{args.seed}), global CMVN of the sentence pool's fbank")


# --------------------------------------------------------------------------------- stream
def run_stream(args, model, cmvn, audio: np.ndarray) -> Dict:
    piece = int(args.piece_ms * SAMPLE_RATE / 1000)
    interval = int(args.interval * SAMPLE_RATE)
    total = len(audio)
    last_minute_start = max(0, total - 60 * SAMPLE_RATE)
    width = model.encoder.layers[0].fc2.out_features
    # every buffer the benchmark fills is allocated (and zero-filled, so resident) before the
    # first RSS sample: the RSS it reports is the stream's
    pushes = -(-total // piece)
    push_cpu = np.zeros(pushes)
    last_minute = torch.zeros(int(60 / FRAME_SECONDS) + 2 * piece, width)
    probe_frames = int(round(1.0 / FRAME_SECONDS))
    intervals = -(-total // interval)
    probes = torch.zeros(intervals, probe_frames, width)  # the first second of each interval
    probe_first = [0] * intervals
    probe_filled = [0] * intervals
    rows = []
    stream = model.start_stream(cmvn=cmvn)
    # the contention reference: a young stream (restarted every interval) pushed the same piece
    # right after every REFERENCE_EVERY-th push; its CPU time tracks how much the shared cores
    # slow this thread down at that moment, at a fixed (small) stream position
    ref_cpu = np.full(pushes, np.nan)
    reference = model.start_stream(cmvn=cmvn)
    reference_pushes = 0

    def sample(minute: float, compute: float, audio_s: float, frames: int, medians) -> Dict:
        census = state_census(stream.encoder_state)
        return {"minute": minute, "rss_mb": current_rss_mb(), "compute_s": float(compute),
                "pushes": push,
                "audio_s": audio_s, "median_push_ms": medians[0] if medians else None,
                "median_reference_push_ms": medians[1] if medians else None,
                "state_tensor_bytes": census.tensor_bytes,
                "state_storage_bytes": census.storage_bytes, "state_tensors": census.tensors,
                "state_entries": census.entries, "state_by_entry": census.by_entry,
                "model_tensor_bytes": model_tensor_census(model).storage_bytes,
                "frames": frames}

    frames, last_minute_first_frame, last_minute_filled = 0, None, 0
    nonfinite, compute, interval_audio, push, interval_first_push = 0, 0.0, 0, 0, 0
    rows.append(sample(0.0, 0.0, 0.0, 0, None))
    started_wall, started_process = time.time(), time.process_time()
    position = 0
    while position < total:
        samples = torch.from_numpy(audio[position:position + piece].astype(np.float32))
        before = time.thread_time()
        stream.push_audio(samples)
        push_cpu[push] = time.thread_time() - before
        compute += push_cpu[push]
        if push % REFERENCE_EVERY == 0:
            before = time.thread_time()
            reference.push_audio(samples)
            elapsed = time.thread_time() - before
            reference.pending = None
            reference_pushes += 1
            if reference_pushes > REFERENCE_WARMUP:
                ref_cpu[push] = elapsed
        push += 1
        new = stream.pending  # the decoder's part: take the new encoder states
        stream.pending = None
        position += samples.numel()
        interval_audio += samples.numel()
        if new is not None and new.size(0):
            new = new[:, 0]
            nonfinite += int((~torch.isfinite(new)).sum())
            index = (position - 1) // interval
            if probe_filled[index] == 0:
                probe_first[index] = frames
            take = min(probe_frames - probe_filled[index], new.size(0))
            probes[index, probe_filled[index]:probe_filled[index] + take] = new[:take]
            probe_filled[index] += take
            if position > last_minute_start:
                if last_minute_first_frame is None:
                    last_minute_first_frame = frames
                last_minute[last_minute_filled:last_minute_filled + new.size(0)] = new
                last_minute_filled += new.size(0)
            frames += new.size(0)
        if position % interval == 0 or position >= total:
            reference, reference_pushes = model.start_stream(cmvn=cmvn), 0
            median = 1000 * float(np.median(push_cpu[interval_first_push:push]))
            ref_window = ref_cpu[interval_first_push:push]
            ref_median = 1000 * float(np.nanmedian(ref_window)) if \
                np.isfinite(ref_window).any() else None
            row = sample(position / SAMPLE_RATE / 60, compute, interval_audio / SAMPLE_RATE,
                         frames, (median, ref_median))
            rows.append(row)
            print(f"[long] {row['minute']:6.2f} min  compute {1000 * compute / row['audio_s']:6.1f}"
                  f" ms/s audio (median push {median:5.2f} ms, reference {ref_median or 0:5.2f})"
                  f"  RSS {row['rss_mb']:8.1f} MB  "
                  f"state {row['state_storage_bytes'] / 1e6:8.3f} MB ({row['state_tensors']} "
                  f"tensors)  model tensors {row['model_tensor_bytes'] / 1e6:7.2f} MB  "
                  f"frames {frames}", flush=True)
            compute, interval_audio, interval_first_push = 0.0, 0, push
    stream.finish_source()
    if stream.pending is not None and stream.pending.size(0):
        raise SystemExit("finish_source produced encoder states: the benchmark expects a causal "
                         "(not unit-causal) encoder")
    return {"rows": rows, "frames": frames, "nonfinite": nonfinite,
            "last_minute": last_minute[:last_minute_filled],
            "last_minute_first_frame": last_minute_first_frame,
            "probes": [(probe_first[i], probes[i, :probe_filled[i]]) for i in range(intervals)],
            "pushes_per_second": SAMPLE_RATE / piece, "push_cpu": push_cpu, "ref_cpu": ref_cpu,
            "stream_wall_s": time.time() - started_wall,
            "stream_process_cpu_s": time.process_time() - started_process}


def offline_float64(model, cmvn, audio: np.ndarray) -> Tuple[torch.Tensor, int, float]:
    """The float64 encoder's parallel forward on the fbank of the whole stream:
    ``((frames, C) float64, peak RSS increase in bytes, CPU seconds)``."""
    from leapformer_fairseq.audio import fbank
    from leapformer_fairseq.profiling import peak_rss_increase

    model.double()

    @torch.no_grad()
    def work():
        features = fbank(torch.from_numpy(audio.astype(np.float32)))
        if cmvn is not None:
            features = cmvn(features)
        features = features.double().unsqueeze(0)
        out = model.encoder(features, torch.tensor([features.size(1)]))
        return out["encoder_out"][0][:, 0]

    before = time.process_time()
    peak, out = peak_rss_increase(work)
    return out, peak, time.process_time() - before


# -------------------------------------------------------------------------------- outputs
def window(rows: List[Dict], stream: Dict, start: float, end: float) -> Dict:
    """Compute per second of audio (ms) over the intervals ending in (start, end] minutes:
    median push CPU time x pushes per second (raw), the same divided by the median reference
    push of the window and multiplied by the median reference push of the whole run
    (contention-normalised), and total CPU time / audio seconds (mean)."""
    chosen = [i for i, r in enumerate(rows) if i and start + 1e-9 < r["minute"] <= end + 1e-9]
    first, last = rows[chosen[0] - 1]["pushes"], rows[chosen[-1]]["pushes"]
    rate = stream["pushes_per_second"]
    raw = 1000 * float(np.median(stream["push_cpu"][first:last])) * rate
    reference = float(np.nanmedian(stream["ref_cpu"][first:last]))
    overall = float(np.nanmedian(stream["ref_cpu"]))
    mean = 1000 * sum(rows[i]["compute_s"] for i in chosen) / sum(rows[i]["audio_s"]
                                                                  for i in chosen)
    return {"raw": raw, "normalised": raw * overall / reference, "mean": mean,
            "reference_push_ms": 1000 * reference}


def rss_at(rows: List[Dict], minute: float) -> Dict:
    return min(rows, key=lambda r: abs(r["minute"] - minute))


def growth(rows: List[Dict], baseline: Dict) -> List[Dict]:
    """State entries (by name) whose bytes grew after the baseline sample."""
    final = rows[-1]["state_by_entry"]
    grown = []
    for name, size in final.items():
        base = baseline["state_by_entry"].get(name, 0)
        if size > base:
            grown.append({"entry": name, "bytes_at_baseline": base, "bytes_at_end": size})
    return sorted(grown, key=lambda g: g["bytes_at_baseline"] - g["bytes_at_end"])


def markdown(report: Dict) -> str:
    m = report["minutes"]
    lines = [
        "# Hour-long speech stream (CPU)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}  ",
        f"Code: {report['code']}  ",
        f"Model: {report['model']}; {report['encoder_layers']} encoder layers, d "
        f"{report['embed_dim']}  ",
        f"Audio: {report['audio']['description']}  ",
        f"Stream: `push_audio` in {report['piece_ms']} ms pieces, encoder only (the decoder is "
        "never run: over an hour its target positions would run out); after each push the "
        "benchmark takes the new encoder states out of `stream.pending`, as `predict` would. "
        f"Samples every {report['interval_s']:.0f} s of audio.  ",
        "Compute = CPU time of the benchmark thread in `push_audio` (`time.thread_time`, torch on "
        f"1 thread), not wall-clock: the {os.cpu_count()} cores are shared with other work. "
        f"Stream phase: {report['stream_wall_s']:.0f} s wall, "
        f"{report['stream_process_cpu_s']:.0f} s process CPU. "
        f"Offline float64 recomputation: {report['offline']['cpu_s']:.0f} s CPU, peak RSS "
        f"+{report['offline']['peak_rss_increase_mb']:.0f} MB.",
        "",
        "## Bars",
        "",
        "| bar | measured | limit | result |",
        "|---|---|---|---|",
    ]
    for bar in report["bars"]:
        verdict = "PASS" if bar["pass"] else "FAIL"
        lines.append(f"| {bar['bar']} | {bar['measured']} | {bar['limit']} | "
                     f"{f'({verdict.lower()})' if bar.get('information') else verdict} |")
    lines += ["", f"Error bound (fixed before the first run): {report['bound_reasoning']}", ""]
    lines += ["## Growing state", ""]
    if report["state_growth"]:
        lines += ["Entries of `stream.encoder_state` whose size grew after minute "
                  f"{report['baseline_minute']:g} (layer ids folded into `*`):", "",
                  "| entry | bytes at baseline | bytes at end |", "|---|---|---|"]
        for g in report["state_growth"]:
            lines.append(f"| `{g['entry']}` | {g['bytes_at_baseline']:,} | "
                         f"{g['bytes_at_end']:,} |")
    else:
        lines.append(f"No entry of `stream.encoder_state` grew after minute "
                     f"{report['baseline_minute']:g}.")
    model_growth = report["model_tensor_growth_bytes"]
    lines += ["", f"Model-side tensors (parameters, buffers, tensor attributes of modules) grew by "
              f"{model_growth:,} bytes between minute {report['baseline_minute']:g} and the end.",
              ""]
    lines += ["## Per interval", "",
              "| minute | compute per s of audio (ms) | median push (ms) | "
              "median reference push (ms) | RSS (MB) | state tensors (bytes) | "
              "state storages (bytes) | tensors | entries | model tensors (MB) | "
              "max abs diff, first s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    errors = [p["max_abs_diff"] for p in report["probes"]]
    for index, row in enumerate(report["rows"][1:]):
        error = errors[index] if index < len(errors) else None
        lines.append(
            f"| {row['minute']:g} | {1000 * row['compute_s'] / row['audio_s']:.1f} | "
            f"{row['median_push_ms']:.2f} | "
            f"{row['median_reference_push_ms'] or float('nan'):.2f} | "
            f"{row['rss_mb']:.1f} | {row['state_tensor_bytes']:,} | "
            f"{row['state_storage_bytes']:,} | {row['state_tensors']} | {row['state_entries']} | "
            f"{row['model_tensor_bytes'] / 1e6:.2f} | "
            f"{'' if error is None else f'{error:.2e}'} |")
    lines += ["", f"(`--minutes {m:g}`; the last column compares the first second of each "
              "interval with the float64 offline encoder.)"]
    return "\n".join(lines) + "\n"


def plot(report: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    minutes = [r["minute"] for r in rows[1:]]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    (rss, compute), (state, error) = axes
    rss.plot([r["minute"] for r in rows], [r["rss_mb"] for r in rows], "o-", markersize=3)
    rss.set(xlabel="minute of audio", ylabel="RSS (MB)", title="resident memory")
    compute.plot(minutes, [1000 * r["compute_s"] / r["audio_s"] for r in rows[1:]], "o-",
                 markersize=3, label="total CPU time / audio time")
    compute.plot(minutes, [r["median_push_ms"] * report["pushes_per_second"] for r in rows[1:]],
                 "s--", markersize=3, label="median push x pushes per s")
    compute.plot(minutes, [(r["median_reference_push_ms"] or float("nan"))
                           * report["pushes_per_second"] for r in rows[1:]],
                 "^:", markersize=3, label="median reference push (young stream) x pushes per s")
    compute.legend(fontsize=8)
    compute.set(xlabel="minute of audio", ylabel="CPU ms per s of audio",
                title="compute per second of audio (thread CPU time)")
    compute.set_ylim(bottom=0)
    state.plot([r["minute"] for r in rows], [r["state_storage_bytes"] / 1e6 for r in rows], "o-",
               markersize=3, label="stream.encoder_state (storages)")
    state.plot([r["minute"] for r in rows], [r["state_tensor_bytes"] / 1e6 for r in rows], "--",
               label="stream.encoder_state (tensor bytes)")
    state.plot([r["minute"] for r in rows], [r["model_tensor_bytes"] / 1e6 for r in rows], ":",
               label="model tensors")
    state.set(xlabel="minute of audio", ylabel="MB", title="state size")
    state.legend(fontsize=8)
    probes = report["probes"]
    error.semilogy([p["minute_start"] for p in probes], [p["max_abs_diff"] for p in probes], "o-",
                   markersize=3, label="first second of each interval")
    error.axhline(report["bound"], color="red", linestyle="--", label="bound (last minute)")
    error.semilogy([report["minutes"]], [report["last_minute_max_abs_diff"]], "s", color="black",
                   label="last minute")
    error.set(xlabel="minute of audio", ylabel="max |float32 stream - float64 offline|",
              title="stream vs float64 offline encoder")
    error.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="minutes of audio")
    parser.add_argument("--interval", type=float, default=60.0,
                        help="seconds of audio between samples")
    parser.add_argument("--piece-ms", type=int, default=200, help="push_audio piece size (ms)")
    parser.add_argument("--pool", type=int, default=200, help="sentences synthesised")
    parser.add_argument("--jobs", type=int, default=2, help="espeak-ng processes in parallel")
    parser.add_argument("--checkpoint", default=None,
                        help="a leapformer_s2t_waitk checkpoint (default: random weights)")
    parser.add_argument("--data-dir", default=None, help="the checkpoint's data directory")
    parser.add_argument("--config-yaml", default="config_st.yaml")
    parser.add_argument("--seed", type=int, default=1,
                        help="weights, sentences, voices, pauses")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    interval_samples = args.interval * SAMPLE_RATE
    piece = args.piece_ms * SAMPLE_RATE / 1000
    if args.minutes <= 0 or args.interval <= 0 or args.piece_ms <= 0:
        raise SystemExit("--minutes, --interval and --piece-ms must be positive")
    if interval_samples % piece or (args.minutes * 60 * SAMPLE_RATE) % interval_samples:
        raise SystemExit("--interval must be a multiple of --piece-ms and divide --minutes")
    if args.interval > args.minutes * 60 / 12:
        raise SystemExit(f"--interval {args.interval:g} s is too coarse for --minutes "
                         f"{args.minutes:g}: the bars' windows start at minute M/12 and need a "
                         f"sample there (use --interval <= {args.minutes * 5:g})")
    torch.set_num_threads(1)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import leapformer_fairseq  # noqa: F401  (registers the models)

    started = time.time()
    pool, texts = synthesise_pool(args)
    pool_seconds = sum(len(a) for a in pool) / SAMPLE_RATE
    audio, talks = build_hour(pool, args.minutes * 60, args.seed)
    description = (
        f"{args.minutes:g} min at 16 kHz, int16 scale: {talks['sentences_placed']} sentences in "
        f"{talks['talks']} talks drawn (with repetition) from a pool of {len(pool)} espeak-ng "
        f"sentences ({pool_seconds:.0f} s of speech; English side of "
        f"data/gettext-mt/en-de.train.tsv, voice and speed per sentence), 0.3-1.2 s of silence "
        f"between sentences and 2-5 s between talks; speech is "
        f"{100 * talks['speech_fraction']:.0f}% of the audio")
    print(f"[long] audio ready in {time.time() - started:.0f} s: {description}", flush=True)
    model, cmvn, model_description = load_model(args, pool)
    del pool

    stream = run_stream(args, model, cmvn, audio)
    rows = stream["rows"]
    layers = len(model.encoder.layers)
    offline, offline_peak, offline_cpu = offline_float64(model, cmvn, audio)
    if offline.size(0) != stream["frames"]:
        raise SystemExit(f"offline encoder gave {offline.size(0)} frames, the stream "
                         f"{stream['frames']}")
    offline_nonfinite = int((~torch.isfinite(offline)).sum())
    first = stream["last_minute_first_frame"]
    reference = offline[first:]
    difference = (stream["last_minute"].double() - reference).abs()
    scale = float(reference.pow(2).mean().sqrt())
    bound = error_bound(layers, stream["frames"], scale)
    probes = [{"minute_start": rows[i]["minute"], "first_frame": start, "frames": states.size(0),
               "max_abs_diff": float((states.double() - offline[start:start + states.size(0)])
                                     .abs().max())}
              for i, (start, states) in enumerate(stream["probes"])]

    minutes = args.minutes
    early = (minutes / 12, minutes / 6)
    late = (5 * minutes / 6, minutes)
    baseline = rss_at(rows, minutes / 12)
    rss_delta = rows[-1]["rss_mb"] - baseline["rss_mb"]
    early_w, late_w = (window(rows, stream, *span) for span in (early, late))
    change = {key: float(late_w[key] / early_w[key] - 1)
              for key in ("raw", "normalised", "mean", "reference_push_ms")}
    max_diff = float(difference.max())
    bars = [
        {"bar": "no NaN/inf in streamed or offline encoder states",
         "measured": f"{stream['nonfinite']} streamed, {offline_nonfinite} offline",
         "limit": "0", "pass": stream["nonfinite"] == 0 and offline_nonfinite == 0},
        {"bar": f"RSS at minute {minutes:g} - RSS at minute {baseline['minute']:g}",
         "measured": f"{rss_delta:+.1f} MB ({baseline['rss_mb']:.1f} -> "
                     f"{rows[-1]['rss_mb']:.1f})",
         "limit": f"<= {RSS_BAR_MB:g} MB", "pass": rss_delta <= RSS_BAR_MB},
        {"bar": f"compute per s of audio, contention-normalised (median push / median "
                f"reference push of the window), minutes {late[0]:g}-{late[1]:g} vs "
                f"{early[0]:g}-{early[1]:g}",
         "measured": f"{late_w['normalised']:.1f} vs {early_w['normalised']:.1f} ms "
                     f"({100 * change['normalised']:+.1f}%)",
         "limit": f"within {100 * COMPUTE_BAR:g}%",
         "pass": abs(change["normalised"]) <= COMPUTE_BAR},
        {"bar": "(information) the same, raw: median push CPU time x pushes per s",
         "measured": f"{late_w['raw']:.1f} vs {early_w['raw']:.1f} ms "
                     f"({100 * change['raw']:+.1f}%); reference push "
                     f"{late_w['reference_push_ms']:.2f} vs {early_w['reference_push_ms']:.2f} "
                     f"ms ({100 * change['reference_push_ms']:+.1f}%)",
         "limit": f"within {100 * COMPUTE_BAR:g}%", "pass": abs(change["raw"]) <= COMPUTE_BAR,
         "information": True},
        {"bar": "(information) the same, total CPU time / audio time (includes the rare costly "
                "pushes and contention bursts)",
         "measured": f"{late_w['mean']:.1f} vs {early_w['mean']:.1f} ms "
                     f"({100 * change['mean']:+.1f}%)",
         "limit": f"within {100 * COMPUTE_BAR:g}%", "pass": abs(change["mean"]) <= COMPUTE_BAR,
         "information": True},
        {"bar": "last minute: max abs diff, float32 stream vs float64 offline",
         "measured": f"{max_diff:.2e} (mean {float(difference.mean()):.1e}; output RMS "
                     f"{scale:.3f}, max |y| {float(reference.abs().max()):.2f})",
         "limit": f"<= {bound:.2e}", "pass": max_diff <= bound},
    ]
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    report = {
        "command": f"{env} .venv/bin/python benchmarks/long_stream.py {' '.join(sys.argv[1:])}"
                   .strip(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"torch threads {torch.get_num_threads()}",
        "model": model_description, "encoder_layers": layers,
        "embed_dim": offline.size(-1),
        "minutes": minutes, "interval_s": args.interval, "piece_ms": args.piece_ms,
        "pushes_per_second": stream["pushes_per_second"],
        "compute_windows": {"early": {"minutes": list(early), **early_w},
                            "late": {"minutes": list(late), **late_w}},
        "seed": args.seed,
        "audio": dict(talks, description=description, pool_sentences=len(texts),
                      pool_speech_s=pool_seconds),
        "stream_wall_s": stream["stream_wall_s"],
        "stream_process_cpu_s": stream["stream_process_cpu_s"],
        "encoder_frames": stream["frames"],
        "offline": {"cpu_s": offline_cpu, "peak_rss_increase_mb": offline_peak / 1e6},
        "last_minute_frames": reference.size(0),
        "last_minute_max_abs_diff": max_diff,
        "last_minute_mean_abs_diff": float(difference.mean()),
        "last_minute_output_rms": scale, "bound": bound,
        "bound_formula": f"{BOUND_FACTOR:g} * eps32 * sqrt(layers * frames) * rms(offline "
                         "output of the last minute)",
        "bound_reasoning": (
            f"{BOUND_FACTOR:g} x eps32 ({FLOAT32_EPS:.3g}) x sqrt(layers {layers} x frames "
            f"{stream['frames']}) x RMS of the offline last-minute output ({scale:.3f}) = "
            f"{bound:.2e}. The float32 recurrent sums of each layer's causal attention "
            "accumulate rounding like a random walk (relative eps x sqrt(frames)); layers add "
            "independent errors through the residual (sqrt(layers)); a factor 2 for the ratio "
            "of two sums and 5 for the maximum over the minute's 1,500 x 256 elements."),
        "baseline_minute": baseline["minute"],
        "bars": [{**bar, "pass": bool(bar["pass"])} for bar in bars],
        "all_pass": all(bool(b["pass"]) for b in bars if not b.get("information")),
        "code": code_version(),
        "state_growth": growth(rows, baseline),
        "model_tensor_growth_bytes": rows[-1]["model_tensor_bytes"]
        - baseline["model_tensor_bytes"],
        "probes": probes, "rows": rows,
        "total_wall_s": time.time() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "long_stream_cpu.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    json_path.with_suffix(".md").write_text(table)
    plot(report, json_path.with_suffix(".png"))
    print(table)
    for bar in bars:
        verdict = "PASS" if bar["pass"] else "FAIL"
        print(f"{f'({verdict.lower()})' if bar.get('information') else verdict}  {bar['bar']}: "
              f"{bar['measured']} "
              f"(limit {bar['limit']})")
    print(f"wrote {json_path} and its .md and .png ({report['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
