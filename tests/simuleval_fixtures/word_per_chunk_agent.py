"""A tiny deterministic SimulEval 1.1 speech-to-text agent for the scorer tests.

It writes one word of a fixed sentence for every ``--ms-per-word`` ms of audio it has read, the
remaining words (one per started ``--ms-per-word`` of the whole utterance) when the source ends,
and sleeps ``--compute-ms`` on every policy call, so computation-aware latency (from wall-clock
``elapsed``) is measurably larger than the non-computation-aware one (from ``delays``). The
delays depend only on the audio lengths and the segment size, so two runs give the same ones.
"""
import math
import time
from argparse import ArgumentParser, Namespace

from simuleval.agents import SpeechToTextAgent
from simuleval.agents.actions import ReadAction, WriteAction
from simuleval.utils import entrypoint

WORDS = "the quick brown fox jumps over the lazy dog and runs far away".split()


@entrypoint
class WordPerChunkAgent(SpeechToTextAgent):
    """Writes ``WORDS[i]`` once ``(i + 1) * ms_per_word`` ms of audio have been read."""

    def __init__(self, args: Namespace) -> None:
        super().__init__(args)
        self.ms_per_word = args.ms_per_word
        self.compute_s = args.compute_ms / 1000

    @staticmethod
    def add_args(parser: ArgumentParser) -> None:
        parser.add_argument("--ms-per-word", type=float, default=300.0)
        parser.add_argument("--compute-ms", type=float, default=20.0)

    def policy(self) -> ReadAction | WriteAction:
        time.sleep(self.compute_s)  # stands in for model compute: only `elapsed` sees it
        states = self.states
        read_ms = 1000 * len(states.source) / max(states.source_sample_rate, 1)
        written = len(states.target)
        if states.source_finished:
            total = min(len(WORDS), math.ceil(read_ms / self.ms_per_word))
            return WriteAction(" ".join(WORDS[written:total]), finished=True)
        if read_ms >= (written + 1) * self.ms_per_word and written < len(WORDS):
            return WriteAction(WORDS[written], finished=False)
        return ReadAction()
