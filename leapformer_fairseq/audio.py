"""Speech features, offline and streaming: 80-dim kaldi fbank and global CMVN.

One definition shared by data preparation (:mod:`leapformer_fairseq.recipes.mustc`), the speech
stream (:mod:`leapformer_fairseq.models.streaming`) and the SimulEval speech agent, so training
features and streamed features are the same numbers.

Conventions: 16 kHz mono; samples in int16 scale (``float * 32768``), as fairseq's kaldi fbank
expects (SimulEval and soundfile give floats in [-1, 1]: use :func:`to_int16_scale`); frames of
25 ms (400 samples) every 10 ms (160 samples), kaldi's ``snip_edges`` (frame ``m`` covers samples
``160 m .. 160 m + 399``), no dither. Each frame depends on its own samples only, which is what
makes :class:`IncrementalFbank` exact.
"""
from pathlib import Path
from typing import Iterable, Sequence, Tuple, Union

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional
from torch import Tensor

SAMPLE_RATE = 16000
NUM_MEL_BINS = 80
FRAME_LENGTH = 400  # samples, 25 ms
FRAME_SHIFT = 160  # samples, 10 ms
INT16_SCALE = 32768.0


def to_int16_scale(samples: Union[Tensor, np.ndarray, Iterable[float]]) -> Tensor:
    """Float samples in [-1, 1] -> float32 tensor in int16 scale, ``(N,)``."""
    return torch.as_tensor(np.asarray(samples, dtype=np.float32)) * INT16_SCALE


def check_finite(samples: Union[Tensor, np.ndarray], what: str) -> None:
    """Refuse audio holding NaN or inf, naming ``what`` (a file or a stream)."""
    samples = torch.as_tensor(samples)
    bad = int((~torch.isfinite(samples)).sum())
    if bad:
        raise ValueError(f"{what}: {bad} of {samples.numel()} samples are NaN or inf")


def frames_to_mono(frames: Sequence, downmix: bool, what: str) -> np.ndarray:
    """SimulEval's speech samples (floats, or one ``[c1, c2, ...]`` frame per sample for
    multi-channel audio, as soundfile reads it) -> ``(N,)`` float32 mono.

    Multi-channel audio is averaged over its channels when ``downmix`` is set and refused
    otherwise, with a message naming ``what`` and the channel count.
    """
    samples = np.asarray(frames, dtype=np.float32)
    if samples.ndim == 1:
        return samples
    if samples.shape[1] != 1 and not downmix:
        raise ValueError(f"{what}: {samples.shape[1]} channels; expected mono audio (pass "
                         "--downmix to average the channels, or convert the wav to mono)")
    return samples.mean(axis=1)


def to_mono_16k(waveform: Tensor, sample_rate: int, resample: bool, what: str) -> Tensor:
    """``(channels, N)`` or ``(N,)`` audio -> ``(N,)`` at 16 kHz mono.

    Audio that is not 16 kHz mono is resampled/down-mixed when ``resample`` is set and refused
    otherwise, with a message naming ``what`` (a file or a stream).
    """
    if waveform.dim() == 1:
        waveform = waveform.unsqueeze(0)
    if waveform.size(0) != 1 or sample_rate != SAMPLE_RATE:
        if not resample:
            raise ValueError(
                f"{what}: {waveform.size(0)} channel(s) at {sample_rate} Hz; expected mono "
                f"{SAMPLE_RATE} Hz (pass --resample to convert)"
            )
        waveform = waveform.mean(dim=0, keepdim=True)
        if sample_rate != SAMPLE_RATE:
            waveform = torchaudio.functional.resample(waveform, sample_rate, SAMPLE_RATE)
    return waveform[0]


def num_frames(num_samples: int) -> int:
    """Fbank frames that ``num_samples`` samples give (kaldi ``snip_edges``)."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


def fbank(samples: Tensor) -> Tensor:
    """80-dim log-mel filterbank of ``(N,)`` int16-scale samples at 16 kHz: ``(frames, 80)``."""
    if num_frames(samples.numel()) == 0:
        return samples.new_zeros(0, NUM_MEL_BINS)
    return kaldi.fbank(samples.reshape(1, -1).float(), num_mel_bins=NUM_MEL_BINS,
                       sample_frequency=SAMPLE_RATE, dither=0.0)


class IncrementalFbank:
    """Fbank of a growing stream, computed once per frame.

    Keeps only the samples a future frame still needs (less than one frame); ``push`` returns
    the frames completed by the new samples, equal to the matching rows of :func:`fbank` on the
    whole stream.
    """

    def __init__(self):
        self.pending = torch.zeros(0)
        self.frames_emitted = 0
        self.samples_seen = 0

    def push(self, samples: Tensor) -> Tensor:
        """``(n,)`` new int16-scale samples -> ``(new_frames, 80)``."""
        self.samples_seen += samples.numel()
        self.pending = torch.cat([self.pending, samples.reshape(-1).float()])
        count = num_frames(self.pending.numel())
        if count == 0:
            return self.pending.new_zeros(0, NUM_MEL_BINS)
        used = FRAME_LENGTH + (count - 1) * FRAME_SHIFT
        frames = fbank(self.pending[:used])
        self.pending = self.pending[count * FRAME_SHIFT:]
        self.frames_emitted += count
        return frames


class GlobalCMVN:
    """Global mean/variance normalisation, with fairseq's statistics file (``mean``, ``std``)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "GlobalCMVN":
        if not Path(path).is_file():
            raise FileNotFoundError(f"global CMVN statistics not found: {path}")
        stats = np.load(path)
        return cls(stats["mean"], stats["std"])

    def __call__(self, features: Tensor) -> Tensor:
        """``(frames, 80)`` -> normalised ``(frames, 80)`` (fairseq's ``GlobalCMVN``)."""
        return (features - self.mean) / self.std


def cmvn_statistics(feature_blocks: Iterable[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Global mean and std over all frames of ``(frames, 80)`` blocks, as fairseq computes
    them (float64 sums; ``std = sqrt(max(var, 1e-8))``)."""
    total, sums, squares = 0, 0.0, 0.0
    for block in feature_blocks:
        block = np.asarray(block, dtype=np.float64)
        total += block.shape[0]
        sums = sums + block.sum(axis=0)
        squares = squares + (block ** 2).sum(axis=0)
    if total == 0:
        raise ValueError("no frames to compute CMVN statistics from")
    mean = sums / total
    std = np.sqrt(np.maximum(squares / total - mean ** 2, 1e-8))
    return mean.astype(np.float32), std.astype(np.float32)
