"""Watch simultaneous translation happen: the source is played in real time (or as fast as
possible with ``--no-realtime``) into the model's stream, and each target word is printed the
moment the wait-k policy writes it, with its delay.

    python -m leapformer_fairseq.translate --checkpoint st.pt --data-dir DATA --wav talk.wav \\
        [--segments talk.yaml] [--segment-ms 200] [--no-realtime] [--output words.json]
    python -m leapformer_fairseq.translate --checkpoint t2t.pt --data-bin DATA/data-bin \\
        --spm DATA/spm.model [--words-per-second 2.5] < sentences.txt

Speech: ``--wav`` is played in ``--segment-ms`` pieces; with ``--segments`` (a MuST-C yaml: one
``offset``/``duration`` per utterance of that wav) each utterance is translated by a fresh stream
on the talk's clock, else the whole wav is one utterance. Text: each stdin line is a sentence,
its words arriving at ``--words-per-second``. Each written word is printed as
``[  source s | written s] word``: how much source the model had read, and the clock when it
was written (source time plus the compute and waiting so far). ``--output`` writes every word
with ``utterance``, ``source_s`` and ``written_s`` as JSON.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from leapformer_fairseq.agent_options import add_stream_args, stream_options
from leapformer_fairseq.audio import SAMPLE_RATE, GlobalCMVN, frames_to_mono, to_int16_scale
from leapformer_fairseq.models.streaming import RefusedInput, load_streaming_model
from leapformer_fairseq.pieces import WordAssembler, load_sentencepiece, predict_words

Source = Tuple[float, object]  # (source seconds once this piece has arrived, the piece)


class Clock:
    """The talk's clock, in seconds from its start. In real time it waits for each piece of
    source to arrive and reads the wall clock; otherwise the model starts on a piece once it has
    arrived and the previous one is done, and is busy for the compute time measured."""

    def __init__(self, realtime: bool):
        self.realtime, self.start, self.busy_until = realtime, time.perf_counter(), 0.0

    def arrive(self, source_s: float) -> None:
        if self.realtime:
            time.sleep(max(0.0, self.start + source_s - time.perf_counter()))

    def done(self, source_s: float, compute_s: float) -> float:
        """When the model is done with the piece that completed ``source_s`` seconds of
        source, after ``compute_s`` seconds of compute."""
        if self.realtime:
            return time.perf_counter() - self.start
        self.busy_until = max(source_s, self.busy_until) + compute_s
        return self.busy_until


def speech_utterances(args) -> Iterator[Tuple[float, List[Source]]]:
    """(start second, pieces) of each utterance of ``--wav``: ``--segment-ms`` of int16-scale
    samples each, with the talk-clock second at which each piece has fully arrived."""
    import soundfile

    if not Path(args.wav).is_file():
        raise RefusedInput(f"[translate] --wav {args.wav}: no such file")
    samples, rate = soundfile.read(args.wav, dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise RefusedInput(f"[translate] --wav {args.wav}: {rate} Hz; the model reads "
                           f"{SAMPLE_RATE} Hz")
    audio = to_int16_scale(frames_to_mono(samples, args.downmix, f"--wav {args.wav}"))
    spans = [(0.0, audio.numel() / SAMPLE_RATE)]
    if args.segments:
        import yaml

        entries = yaml.safe_load(Path(args.segments).read_text(encoding="utf-8")) or []
        name = Path(args.wav).name
        spans = [(float(e["offset"]), float(e["offset"]) + float(e["duration"]))
                 for e in entries if e.get("wav", name) == name]
        if not spans:
            raise RefusedInput(f"[translate] --segments {args.segments}: no segment of {name}")
    step = round(args.segment_ms * SAMPLE_RATE / 1000)
    for start, end in spans:
        first, last = round(start * SAMPLE_RATE), round(end * SAMPLE_RATE)
        yield start, [(min(i + step, last) / SAMPLE_RATE, audio[i:min(i + step, last)])
                      for i in range(first, last, step)]


def text_utterances(args, lines: Sequence[str]) -> Iterator[Tuple[float, List[Source]]]:
    """(start second, words) of each non-empty line, a word every 1 / ``--words-per-second``
    seconds on one clock over all lines."""
    clock = 0.0
    for line in lines:
        words = line.split()
        if not words:
            continue
        start = clock
        pieces = []
        for word in words:
            clock += 1.0 / args.words_per_second
            pieces.append((clock, word))
        yield start, pieces


def translate(args, utterances: Iterator[Tuple[float, List[Source]]], model, task, spm,
              push: Callable, cmvn: Optional[GlobalCMVN]) -> List[Dict]:
    """Stream every utterance, ``push(stream, piece)`` feeding it; print and return each word
    with its source and written time."""
    clock, records = Clock(args.realtime), []
    for number, (start, pieces) in enumerate(utterances):
        stream_kwargs = {} if cmvn is None else {"cmvn": cmvn}
        stream = model.start_stream(**stream_kwargs, **stream_options(args))
        assembler = WordAssembler(spm)
        print(f"--- utterance {number} (from {start:.2f} s)", flush=True)
        source_s = start
        for index in range(len(pieces) + 1):
            if index < len(pieces):
                source_s, piece = pieces[index]
                clock.arrive(source_s)
            began = time.perf_counter()
            if index < len(pieces):
                push(stream, piece)
            else:
                stream.finish_source()
            words = predict_words(stream, task.target_dictionary, assembler)
            written = clock.done(source_s, time.perf_counter() - began)
            for word in words:
                print(f"[{source_s:7.2f} s | {written:7.2f} s] {word}", flush=True)
                records.append({"utterance": number, "word": word,
                                "source_s": round(source_s, 3), "written_s": round(written, 3)})
            if stream.finished and index < len(pieces):
                break
    return records


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stream_args(parser, unit="units", max_len_a=3.0)
    parser.add_argument("--wav", help="speech: a 16 kHz wav (else text is read from stdin)")
    parser.add_argument("--segments", help="speech: a MuST-C yaml of --wav's utterances")
    parser.add_argument("--data-dir", help="speech: the data directory (default: the "
                                           "checkpoint's)")
    parser.add_argument("--config-yaml", default="config_st.yaml",
                        help="speech: data config in --data-dir (default config_st.yaml)")
    parser.add_argument("--segment-ms", type=int, default=200,
                        help="speech: audio per push (default 200)")
    parser.add_argument("--downmix", action="store_true",
                        help="speech: average the channels of a multi-channel wav")
    parser.add_argument("--data-bin", help="text: the dictionaries (default: the checkpoint's)")
    parser.add_argument("--spm", help="text: the SentencePiece model (required for text)")
    parser.add_argument("--words-per-second", type=float, default=2.5,
                        help="text: source words arriving per second (default 2.5)")
    parser.add_argument("--no-realtime", dest="realtime", action="store_false",
                        help="as fast as possible; written times then add the compute time to "
                             "the source time")
    parser.add_argument("--output", help="write the timed words as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.segment_ms <= 0 or args.words_per_second <= 0:
        raise SystemExit("[translate] --segment-ms and --words-per-second must be positive")
    if args.wav:
        model, task = load_streaming_model(args.checkpoint, args.data_dir,
                                           overrides={"config_yaml": args.config_yaml})
        cmvn_path = task.data_cfg.global_cmvn_stats_npz
        cmvn = GlobalCMVN.load(cmvn_path) if cmvn_path else None
        spm = load_sentencepiece(task.data_cfg.bpe_tokenizer["sentencepiece_model"],
                                 f"--config-yaml {args.config_yaml}")
        utterances = speech_utterances(args)

        def push(stream, samples):
            stream.push_audio(samples)
    else:
        if not args.spm:
            raise SystemExit("[translate] text input needs --spm (or pass --wav for speech)")
        model, task = load_streaming_model(args.checkpoint, args.data_bin)
        cmvn = None
        spm = load_sentencepiece(args.spm, "--spm")
        utterances = text_utterances(args, sys.stdin.read().splitlines())

        def push(stream, word):
            stream.push_source([task.source_dictionary.index(piece)
                                for piece in spm.encode(word, out_type=str)])
    records = translate(args, utterances, model, task, spm, push, cmvn)
    if args.output:
        Path(args.output).write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n",
                                     encoding="utf-8")


if __name__ == "__main__":
    main()
