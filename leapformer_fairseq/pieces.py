"""Whole words from a stream of SentencePiece pieces, for the SimulEval agents."""
from pathlib import Path
from typing import List

import sentencepiece

from leapformer_fairseq.models.streaming import RefusedInput

WORD_START = "\u2581"


def load_sentencepiece(path: str, flag: str) -> sentencepiece.SentencePieceProcessor:
    """The SentencePiece model at ``path``; a missing or unreadable file is refused naming
    ``flag`` and the file (SentencePiece's own errors do not name it)."""
    if not Path(path).is_file():
        raise RefusedInput(f"{flag}: SentencePiece model not found: {path}")
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as error:
        raise RefusedInput(f"{flag}: {path} is not a SentencePiece model "
                           f"({str(error).strip()})") from None


class WordAssembler:
    """Collects predicted pieces and releases a word once the next word has started. Pieces
    that decode to nothing (a lone word boundary) release no word."""

    def __init__(self, spm: sentencepiece.SentencePieceProcessor):
        self.spm = spm
        self.partial: List[str] = []

    def push(self, piece: str) -> List[str]:
        """Add one piece; returns the word it completes (``[]`` or one word)."""
        completed = []
        if piece.startswith(WORD_START) and self.partial:
            completed = self.flush()
        self.partial.append(piece)
        return completed

    def flush(self) -> List[str]:
        """The word in progress, at the end of the sentence."""
        word = self.spm.decode_pieces(self.partial).strip()
        self.partial = []
        return [word] if word else []


def predict_words(stream, target_dictionary, assembler: WordAssembler) -> List[str]:
    """Predict every target token the stream's wait-k schedule allows now; returns the words
    they complete, and once the stream has predicted EOS, the last word too."""
    words: List[str] = []
    while stream.ready_to_write() and not stream.finished:
        token = stream.predict()
        if token == target_dictionary.eos():
            break
        words += assembler.push(target_dictionary[token])
    if stream.finished:
        words += assembler.flush()
    return words
