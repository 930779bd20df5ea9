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
"""
from argparse import ArgumentParser, Namespace

import sentencepiece
import torch
from simuleval.agents import SpeechToTextAgent
from simuleval.agents.actions import ReadAction, WriteAction
from simuleval.utils import entrypoint

from leapformer_fairseq.audio import SAMPLE_RATE, GlobalCMVN, to_int16_scale
from leapformer_fairseq.models.streaming import load_streaming_model
from leapformer_fairseq.pieces import WordAssembler, predict_words


@entrypoint
class LeaPWaitkSpeechAgent(SpeechToTextAgent):
    def __init__(self, args: Namespace):
        torch.set_num_threads(args.threads)
        self.model, task = load_streaming_model(
            args.checkpoint, args.data_dir, args.device,
            overrides={"config_yaml": args.config_yaml})
        self.target_dictionary = task.target_dictionary
        data_cfg = task.data_cfg
        spm_path = (data_cfg.bpe_tokenizer or {}).get("sentencepiece_model")
        if not spm_path:
            raise ValueError(f"{args.config_yaml}: no bpe_tokenizer.sentencepiece_model")
        self.spm = sentencepiece.SentencePieceProcessor(model_file=spm_path)
        cmvn_path = data_cfg.global_cmvn_stats_npz
        self.cmvn = GlobalCMVN.load(cmvn_path) if cmvn_path else None
        self.stream_options = dict(waitk=args.waitk, max_len_a=args.max_len_a,
                                   max_len_b=args.max_len_b, recompute=args.recompute,
                                   eos_before_end=args.eos_before_end)
        super().__init__(args)  # calls reset()

    @staticmethod
    def add_args(parser: ArgumentParser) -> None:
        parser.add_argument("--checkpoint", required=True,
                            help="a leapformer_s2t_waitk checkpoint")
        parser.add_argument("--data-dir", default=None,
                            help="the speech data directory (config, vocabulary, CMVN stats; "
                                 "default: the checkpoint's training data directory)")
        parser.add_argument("--config-yaml", default="config_st.yaml",
                            help="data config inside --data-dir (default config_st.yaml)")
        parser.add_argument("--waitk", type=int, default=None,
                            help="lagging k in source units (default: the model's)")
        parser.add_argument("--max-len-a", type=float, default=3.0,
                            help="stop at max-len-a * source units + max-len-b target pieces")
        parser.add_argument("--max-len-b", type=int, default=10)
        parser.add_argument("--eos-before-end", action="store_true",
                            help="let the model end the translation (EOS) before its wait-k "
                                 "window covers the whole utterance (default: not)")
        parser.add_argument("--threads", type=int, default=1,
                            help="torch CPU threads (default 1: one sentence's small steps gain "
                                 "nothing from more, and lose much on a busy machine)")
        parser.add_argument("--recompute", action="store_true",
                            help="recompute fbank, encoder and decoder over the whole prefix "
                                 "at every step (the reference implementation's way)")

    def reset(self) -> None:
        super().reset()
        self.stream = self.model.start_stream(cmvn=self.cmvn, **self.stream_options)
        self.samples_pushed = 0
        self.word_assembler = WordAssembler(self.spm)

    def policy(self) -> ReadAction | WriteAction:
        new_samples = self.states.source[self.samples_pushed:]
        if new_samples and not self.stream.finished:  # after EOS the audio is not needed
            if self.states.source_sample_rate != SAMPLE_RATE:
                raise ValueError(
                    f"source audio at {self.states.source_sample_rate} Hz; this agent reads "
                    f"{SAMPLE_RATE} Hz (resample the wav files, e.g. prep_mustc.py --resample)")
            self.stream.push_audio(to_int16_scale(new_samples))
        self.samples_pushed = len(self.states.source)
        if self.states.source_finished:
            self.stream.finish_source()

        words = predict_words(self.stream, self.target_dictionary, self.word_assembler)
        # finished=True only once the source is finished: SimulEval resets a speech agent that
        # finishes early and feeds the rest of the audio to the fresh one
        if self.states.source_finished:
            return WriteAction(" ".join(words), finished=True)
        if words:
            return WriteAction(" ".join(words), finished=False)
        return ReadAction()
