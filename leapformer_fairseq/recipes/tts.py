"""Synthesise the source side of a parallel corpus with espeak-ng, in the MuST-C layout
(``scripts/make_tts_corpus.py``).

    python scripts/make_tts_corpus.py --corpus data/gettext-mt/en-de.{split}.tsv --src en \
        --tgt de --out work/tts-mustc --max-train 2000 --max-valid 100 --max-test 100
    python scripts/prep_mustc.py --data-root work/tts-mustc --lang de --out work/tts-mustc/prep

Writes ``OUT/<src>-<tgt>/data/<split>/wav/<talk>.wav`` and ``.../txt/<split>.{yaml,<src>,<tgt>}``
for the MuST-C splits ``train``, ``dev`` and ``tst-COMMON`` (from the corpus' train, valid and
test), so ``scripts/prep_mustc.py`` reads it like real MuST-C. ``tst-HE`` holds the test pairs
again, spoken by ``--heldout-voices``, which no other split uses: whether a model learned speech
or the training voices. ``--splits`` writes some of the splits only (e.g. the two test sets,
to evaluate here a model trained elsewhere on the same corpus: the audio is a function of the
corpus and the settings). Consecutive utterances are grouped
into talks of ``--per-talk`` utterances: one 16 kHz mono int16 wav each, the utterances separated
by seeded pauses, one voice and speed per talk (seeded). The yaml lists one segment per utterance
(``duration``, ``offset`` in seconds, ``speaker_id``, ``wav``) in the order of the text lines.

The corpus is a gettext-mt TSV (header line naming the columns, e.g. ``domain<TAB>en<TAB>de``)
given as a pattern with ``{split}``.
"""
import argparse
import io
import json
import random
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import soundfile
import torch

from leapformer_fairseq.audio import SAMPLE_RATE, to_mono_16k
from leapformer_fairseq.recipes.common import Recipe, atomic_output, read_tsv_pairs, write_text

SPLITS = {"train": "train", "valid": "dev", "test": "tst-COMMON"}  # corpus -> MuST-C
HELDOUT_SPLIT = "tst-HE"  # the test pairs in the held-out voices
MUSTC_SPLITS = (*SPLITS.values(), HELDOUT_SPLIT)
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+m3")  # espeak-ng voice[+variant], by default
HELDOUT_VOICES = ("en-gb-x-rp+m5", "en-us-nyc+f4")  # other accents and variants
SPEEDS = (140, 165, 190)  # words per minute
MARKER = "tts_corpus.json"  # settings of the last run; its presence allows overwriting
ESPEAK = "espeak-ng"

log = Recipe("tts").log


def espeak(arguments: Sequence[str], text: str) -> subprocess.CompletedProcess:
    """espeak-ng with the text on stdin (UTF-8), so text starting with ``-`` is no option."""
    return subprocess.run([ESPEAK, "-b", "1", *arguments], input=text.encode("utf-8"),
                          capture_output=True)


def check_voices(voices: Sequence[str], flag: str) -> None:
    """Stop unless espeak-ng is installed and knows every voice and ``+variant`` of ``flag``."""
    if shutil.which(ESPEAK) is None:
        raise SystemExit(f"[tts] {ESPEAK} not found on PATH; install it "
                         f"(apt-get install espeak-ng)")
    listing = subprocess.run([ESPEAK, "--voices=variant"], capture_output=True, text=True)
    variants = {line.split()[4].split("/")[-1].lower()
                for line in listing.stdout.splitlines()[1:] if len(line.split()) >= 5}
    for voice in voices:
        base, _, variant = voice.partition("+")
        if variant and variant.lower() not in variants:
            raise SystemExit(f"[tts] {flag}: espeak-ng has no variant '{variant}' "
                             f"(see espeak-ng --voices=variant)")
        done = espeak(["-v", base, "--stdout"], "test")
        if done.returncode != 0:
            raise SystemExit(f"[tts] {flag}: espeak-ng does not know voice '{base}' "
                             f"(see espeak-ng --voices=en): {done.stderr.decode().strip()}")


def synthesise(text: str, voice: str, speed: int, what: str) -> np.ndarray:
    """One utterance -> int16 samples at 16 kHz mono (espeak-ng speaks at 22.05 kHz)."""
    done = espeak(["-v", voice, "-s", str(speed), "--stdout"], text)
    if done.returncode != 0:
        raise SystemExit(f"[tts] synthesise {what}: espeak-ng failed (exit code "
                         f"{done.returncode}): {done.stderr.decode().strip()}")
    samples, sample_rate = soundfile.read(io.BytesIO(done.stdout), dtype="float32",
                                          always_2d=True)
    waveform = to_mono_16k(torch.from_numpy(samples.T.copy()), sample_rate, resample=True,
                           what=what)
    return np.clip(np.round(waveform.numpy() * 32768.0), -32768, 32767).astype(np.int16)


def talk_plan(args, split: str, talk: int) -> Tuple[str, int, random.Random]:
    """Voice, speed and the pause generator of one talk, from ``--seed`` alone; the voice from
    ``--heldout-voices`` in the held-out split, else from ``--voices``."""
    rng = random.Random(f"{args.seed}/{split}/{talk}")
    voices = args.heldout_voices if split == HELDOUT_SPLIT else args.voices
    return rng.choice(voices), rng.choice(args.speeds), rng


def pause(rng: random.Random, args) -> np.ndarray:
    return np.zeros(round(rng.uniform(*args.pause) * SAMPLE_RATE), dtype=np.int16)


def write_split(args, split: str, pairs: List[Tuple[str, str]], out: Path) -> Dict[str, float]:
    """Synthesise one split into ``out/data/<split>/{wav,txt}``; its hours of audio (pauses
    included) and megabytes of wav."""
    wav_dir, txt_dir = out / "data" / split / "wav", out / "data" / split / "txt"
    wav_dir.mkdir(parents=True)
    txt_dir.mkdir(parents=True)
    for side, index in ((args.src, 0), (args.tgt, 1)):
        write_text(txt_dir / f"{split}.{side}", "".join(pair[index] + "\n" for pair in pairs))
    starts = range(0, len(pairs), args.per_talk)
    plans = [talk_plan(args, split, talk) for talk in range(len(starts))]
    jobs = []
    for number, (source, _) in enumerate(pairs):
        voice, speed, _ = plans[number // args.per_talk]
        jobs.append((source, voice, speed, f"{split} utterance {number} (TSV line {number + 2})"))
    entries, started, last_log, samples = [], time.time(), time.time(), 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        utterances = pool.map(lambda job: synthesise(*job), jobs)
        for talk, start in enumerate(starts):
            voice, speed, rng = plans[talk]
            name = f"tts_{split}_{talk:04d}.wav"
            pieces, position = [], 0
            for _ in range(start, min(start + args.per_talk, len(pairs))):
                pieces.append(pause(rng, args))
                position += len(pieces[-1])
                pieces.append(next(utterances))
                entries.append(f"- {{duration: {len(pieces[-1]) / SAMPLE_RATE:.6f}, offset: "
                               f"{position / SAMPLE_RATE:.6f}, speaker_id: {voice}_{speed}, "
                               f"wav: {name}}}\n")
                position += len(pieces[-1])
            pieces.append(pause(rng, args))
            samples += position + len(pieces[-1])
            with atomic_output(wav_dir / name) as partial:
                soundfile.write(partial, np.concatenate(pieces), SAMPLE_RATE, subtype="PCM_16")
            if time.time() - last_log > 10 or talk == len(starts) - 1:
                last_log = time.time()
                log(f"{split}: {len(entries)}/{len(pairs)} utterances, {talk + 1}/{len(starts)} "
                    f"talks ({time.time() - started:.0f} s)")
    write_text(txt_dir / f"{split}.yaml", "".join(entries))
    size = {"hours": round(samples / SAMPLE_RATE / 3600, 3),
            "megabytes": round(sum(p.stat().st_size for p in wav_dir.iterdir()) / 2**20, 1)}
    log(f"{split}: {size['hours']:.3f} h of audio, {size['megabytes']:.1f} MB of wav")
    return size


def clear_output(out: Path, splits: Sequence[str]) -> None:
    """Remove the splits a previous run wrote; refuse to touch anything else."""
    existing = [out / "data" / split for split in splits if (out / "data" / split).exists()]
    if existing and not (out / MARKER).is_file():
        raise SystemExit(f"[tts] {existing[0]} exists and was not written by this script "
                         f"(no {out / MARKER}); choose another --out")
    for path in existing:
        log(f"removing the previous {path}")
        shutil.rmtree(path)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True,
                        help="gettext-mt TSV path with {split}, e.g. en-de.{split}.tsv")
    parser.add_argument("--src", default="en", help="source column, synthesised")
    parser.add_argument("--tgt", default="de", help="target column")
    parser.add_argument("--out", required=True, help="writes OUT/<src>-<tgt>/data/<split>/...")
    for split in SPLITS:
        parser.add_argument(f"--max-{split}", type=int, default=0,
                            help=f"keep the first N {split} pairs (0: all)")
    parser.add_argument("--per-talk", type=int, default=10, help="utterances per talk wav")
    parser.add_argument("--voices", default=",".join(VOICES),
                        help="espeak-ng voices[+variant], one chosen per talk")
    parser.add_argument("--heldout-voices", default=",".join(HELDOUT_VOICES),
                        help=f"voices of the {HELDOUT_SPLIT} split (the test pairs again), none "
                             "of them in --voices; empty: no such split")
    parser.add_argument("--speeds", default=",".join(map(str, SPEEDS)),
                        help="espeak-ng speeds (words per minute), one chosen per talk")
    parser.add_argument("--pause", type=float, nargs=2, default=[0.3, 0.7],
                        metavar=("MIN", "MAX"), help="seconds of silence around utterances")
    parser.add_argument("--seed", type=int, default=1, help="voices, speeds and pauses")
    parser.add_argument("--splits", default=",".join(MUSTC_SPLITS),
                        help="the MuST-C splits to write, comma-separated (default: all); e.g. "
                             f"tst-COMMON,{HELDOUT_SPLIT}: only the test sets, which are the same "
                             "audio wherever the same corpus and settings are synthesised")
    parser.add_argument("--jobs", type=int, default=4, help="espeak-ng processes in parallel")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # parallel over utterances (--jobs); small tensors contend
    args.voices = [voice for voice in args.voices.split(",") if voice]
    args.heldout_voices = [voice for voice in args.heldout_voices.split(",") if voice]
    args.splits = [split for split in args.splits.split(",") if split]
    unknown = [split for split in args.splits if split not in MUSTC_SPLITS]
    if unknown or not args.splits:
        raise SystemExit(f"[tts] --splits: {unknown[0] if unknown else 'none given'}; choose "
                         f"from {','.join(MUSTC_SPLITS)}")
    try:
        args.speeds = [int(speed) for speed in args.speeds.split(",") if speed]
    except ValueError:
        raise SystemExit(f"[tts] --speeds must be integers, got '{args.speeds}'")
    for flag, ok in (("--per-talk must be >= 1", args.per_talk >= 1),
                     ("--jobs must be >= 1", args.jobs >= 1),
                     ("--voices must name a voice", bool(args.voices)),
                     ("--speeds must be positive", bool(args.speeds) and min(args.speeds) > 0)):
        if not ok:
            raise SystemExit(f"[tts] {flag}")
    if not 0 <= args.pause[0] <= args.pause[1]:
        raise SystemExit(f"[tts] --pause needs 0 <= MIN <= MAX, got {args.pause}")
    heard = [voice for voice in args.heldout_voices if voice in args.voices]
    if heard:
        raise SystemExit(f"[tts] --heldout-voices: {heard[0]} is in --voices too; a held-out "
                         "voice is one the training never hears")
    check_voices(args.voices, "--voices")
    check_voices(args.heldout_voices, "--heldout-voices")

    plan = [(split, mustc_split, args.voices) for split, mustc_split in SPLITS.items()]
    if args.heldout_voices:
        plan.append(("test", HELDOUT_SPLIT, args.heldout_voices))
    plan = [step for step in plan if step[1] in args.splits]
    pairs: Dict[str, List[Tuple[str, str]]] = {}
    for split in dict.fromkeys(split for split, _, _ in plan):  # in plan order
        pairs[split] = read_tsv_pairs(args.corpus, split, args.src, args.tgt, "tts", "read")
        limit = getattr(args, f"max_{split}")
        if limit:
            pairs[split] = pairs[split][:limit]
    out = Path(args.out) / f"{args.src}-{args.tgt}"
    clear_output(out, MUSTC_SPLITS)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "corpus": args.corpus, "src": args.src, "tgt": args.tgt, "per_talk": args.per_talk,
        "voices": args.voices, "heldout_voices": args.heldout_voices, "speeds": args.speeds,
        "pause": args.pause, "seed": args.seed,
        "pairs": {mustc_split: len(pairs[split]) for split, mustc_split, _ in plan}}
    write_text(out / MARKER, json.dumps(settings, indent=2) + "\n")
    settings["size"] = {}
    for split, mustc_split, voices in plan:
        log(f"{mustc_split}: {len(pairs[split])} utterances from the {split} TSV, voices "
            f"{','.join(voices)}, {args.per_talk} per talk, {args.jobs} espeak-ng jobs")
        settings["size"][mustc_split] = write_split(args, mustc_split, pairs[split], out)
    write_text(out / MARKER, json.dumps(settings, indent=2) + "\n")
    log(f"done -> {out}")
