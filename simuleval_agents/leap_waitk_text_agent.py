"""SimulEval 1.1 text-to-text agent: wait-k decoding streamed through the model's state.

    simuleval --agent simuleval_agents/leap_waitk_text_agent.py \
        --source test.en --target test.de --checkpoint checkpoint_best.pt \
        --data-bin data-bin --spm spm.model --output out/

Incoming source words are cut into SentencePiece pieces (the units the model was trained on)
and pushed into the stream; target pieces are predicted greedily as wait-k allows and written
as whole detokenised words. The agent only talks to the model's streaming API
(``model.start_stream()``: push_source / finish_source / predict). SimulEval's own
``--device`` option picks the device. Unusable inputs (checkpoint, dictionaries, SentencePiece
model) end the run with one line naming the file.
"""
from argparse import ArgumentParser, Namespace

import torch
from simuleval.agents import TextToTextAgent
from simuleval.agents.actions import ReadAction, WriteAction
from simuleval.utils import entrypoint

from leapformer_fairseq.agent_options import add_stream_args, stream_options
from leapformer_fairseq.models.streaming import load_streaming_model
from leapformer_fairseq.pieces import WordAssembler, load_sentencepiece, predict_words


@entrypoint
class LeaPWaitkTextAgent(TextToTextAgent):
    def __init__(self, args: Namespace):
        torch.set_num_threads(args.threads)
        self.spm = load_sentencepiece(args.spm, "--spm")
        self.model, task = load_streaming_model(args.checkpoint, args.data_bin, args.device)
        self.source_dictionary = task.source_dictionary
        self.target_dictionary = task.target_dictionary
        self.stream_options = stream_options(args)
        super().__init__(args)  # calls reset()

    @staticmethod
    def add_args(parser: ArgumentParser) -> None:
        add_stream_args(parser, unit="pieces", max_len_a=2.0)
        parser.add_argument("--data-bin", default=None,
                            help="directory with the fairseq dictionaries (default: the "
                                 "checkpoint's training data directory)")
        parser.add_argument("--spm", required=True, help="SentencePiece model of the corpus")

    def reset(self) -> None:
        super().reset()
        self.stream = self.model.start_stream(**self.stream_options)
        self.words_pushed = 0
        self.word_assembler = WordAssembler(self.spm)

    def policy(self) -> ReadAction | WriteAction:
        for word in self.states.source[self.words_pushed:]:
            pieces = self.spm.encode(word, out_type=str)
            self.stream.push_source([self.source_dictionary.index(p) for p in pieces])
        self.words_pushed = len(self.states.source)
        if self.states.source_finished:
            self.stream.finish_source()

        words = predict_words(self.stream, self.target_dictionary, self.word_assembler)
        if self.stream.finished:
            return WriteAction(" ".join(words), finished=True)
        if words:
            return WriteAction(" ".join(words), finished=False)
        return ReadAction()
