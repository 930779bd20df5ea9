"""SimulEval 1.1 speech-to-text agent: wait-k decoding streamed through the model's state.

    simuleval --agent simuleval_agents/leap_waitk_speech_agent.py \
        --source wav_list.txt --target refs.de --checkpoint st/checkpoint_best.pt \
        --data-dir data/ --config-yaml config_st.yaml --output out/

Each call pushes the audio that arrived since the last one into the model's stream
(``model.start_stream()``: push_audio / finish_source / predict), which computes fbank on the new
samples only and advances the encoder by the new frames only. SimulEval hands over floats in
[-1, 1]; the training features were computed at int16 scale, so samples are scaled by 32768.
Target pieces are written as whole detokenised words. Once the source is finished, everything
left is written in one action with ``finished=True`` (SimulEval makes one call after the end,
and only a finished prediction resets the agent for the next utterance); an EOS predicted
earlier ends the translation, but ``finished=True`` still waits for the end of the source.

Audio the agent cannot use ends the run with one line naming the ``--source`` line and wav:
a rate other than 16 kHz, more than one channel (unless ``--downmix``), NaN or inf samples; an
utterance shorter than one fbank frame translates to nothing, with a warning naming it. So do
an unusable checkpoint or data directory, naming the file.
"""
import logging
from argparse import ArgumentParser, Namespace
from pathlib import Path

import torch
from simuleval.agents import SpeechToTextAgent
from simuleval.agents.actions import ReadAction, WriteAction
from simuleval.utils import entrypoint

from leapformer_fairseq.agent_options import add_stream_args, stream_options
from leapformer_fairseq.audio import (
    FRAME_LENGTH,
    SAMPLE_RATE,
    GlobalCMVN,
    frames_to_mono,
    to_int16_scale,
)
from leapformer_fairseq.models.streaming import RefusedInput, load_streaming_model
from leapformer_fairseq.pieces import WordAssembler, load_sentencepiece, predict_words

logger = logging.getLogger(__name__)


@entrypoint
class LeaPWaitkSpeechAgent(SpeechToTextAgent):
    def __init__(self, args: Namespace):
        torch.set_num_threads(args.threads)
        self.model, task = load_streaming_model(
            args.checkpoint, args.data_dir, args.device,
            overrides={"config_yaml": args.config_yaml})
        self.target_dictionary = task.target_dictionary
        data_cfg = task.data_cfg
        self.spm = load_sentencepiece(data_cfg.bpe_tokenizer["sentencepiece_model"],
                                      f"--config-yaml {args.config_yaml}")
        cmvn_path = data_cfg.global_cmvn_stats_npz
        self.cmvn = GlobalCMVN.load(cmvn_path) if cmvn_path else None
        self.stream_options = dict(stream_options(args), eos_before_end=args.eos_before_end)
        self.downmix = args.downmix
        self.source_list = getattr(args, "source", None)
        self.utterance = getattr(args, "start_index", 0)  # index in --source, for messages
        super().__init__(args)  # calls reset()

    @staticmethod
    def add_args(parser: ArgumentParser) -> None:
        add_stream_args(parser, unit="units", max_len_a=3.0)
        parser.add_argument("--data-dir", default=None,
                            help="the speech data directory (config, vocabulary, CMVN stats; "
                                 "default: the checkpoint's training data directory)")
        parser.add_argument("--config-yaml", default="config_st.yaml",
                            help="data config inside --data-dir (default config_st.yaml)")
        parser.add_argument("--eos-before-end", action="store_true",
                            help="let the model end the translation (EOS) before its wait-k "
                                 "window covers the whole utterance (default: not)")
        parser.add_argument("--downmix", action="store_true",
                            help="average the channels of multi-channel audio (default: "
                                 "refuse it)")

    def reset(self) -> None:
        super().reset()
        self.stream = self.model.start_stream(cmvn=self.cmvn, **self.stream_options)
        self.samples_pushed = 0
        self.word_assembler = WordAssembler(self.spm)

    def source_name(self) -> str:
        """The utterance being read, for messages: its ``--source`` line and wav."""
        name = f"utterance {self.utterance}"
        if self.source_list and Path(self.source_list).is_file():
            lines = Path(self.source_list).read_text(encoding="utf-8").splitlines()
            if self.utterance < len(lines):
                name = f"{self.source_list}:{self.utterance + 1} ({lines[self.utterance]})"
        return name

    def push_new_samples(self) -> None:
        """Push the samples that arrived since the last call, refusing audio the model
        cannot use with a message naming the utterance."""
        new_samples = self.states.source[self.samples_pushed:]
        self.samples_pushed = len(self.states.source)
        if not new_samples or self.stream.finished:  # after EOS the audio is not needed
            return
        if self.states.source_sample_rate != SAMPLE_RATE:
            raise RefusedInput(
                f"{self.source_name()}: audio at {self.states.source_sample_rate} Hz; this agent "
                f"reads {SAMPLE_RATE} Hz (resample the wav files, e.g. prep_mustc.py --resample)")
        try:
            samples = frames_to_mono(new_samples, self.downmix, "audio")
            self.stream.push_audio(to_int16_scale(samples))
        except ValueError as error:
            raise RefusedInput(f"{self.source_name()}: {error}") from None

    def policy(self) -> ReadAction | WriteAction:
        self.push_new_samples()
        if self.states.source_finished:
            if len(self.states.source) < FRAME_LENGTH:
                logger.warning(f"{self.source_name()}: {len(self.states.source)} samples, "
                               f"shorter than one fbank frame ({FRAME_LENGTH}); translated to "
                               "nothing")
            self.stream.finish_source()

        words = predict_words(self.stream, self.target_dictionary, self.word_assembler)
        # finished=True only once the source is finished: SimulEval resets a speech agent that
        # finishes early and feeds the rest of the audio to the fresh one
        if self.states.source_finished:
            self.utterance += 1
            return WriteAction(" ".join(words), finished=True)
        if words:
            return WriteAction(" ".join(words), finished=False)
        return ReadAction()
