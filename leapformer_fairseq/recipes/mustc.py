"""MuST-C (or ``scripts/make_tts_corpus.py`` output) -> fairseq speech_to_text data for ASR and ST
(``scripts/prep_mustc.py``).

    python scripts/prep_mustc.py --data-root MUSTC_ROOT --lang de --out work/mustc-en-de

Reads ``ROOT/en-<lang>/data/<split>/{wav/*.wav, txt/<split>.yaml, txt/<split>.en,
txt/<split>.<lang>}`` and writes to OUT:

* ``fbank80/<talk>_<index>.npy``: 80-dim kaldi fbank per segment (float32,
  :func:`leapformer_fairseq.audio.fbank`, the features the streaming agents compute);
* ``<split>_asr.tsv`` / ``<split>_st.tsv``: manifests (``id audio n_frames tgt_text speaker``;
  English transcript / translation as target);
* ``gcmvn.npz``: global CMVN statistics of the train split (``mean``, ``std``);
* ``spm_asr.{model,txt}`` / ``spm_st.{model,txt}``: SentencePiece unigram models of the train
  targets and their fairseq dictionaries; with ``--st-vocab-from T2T_DATA`` the translations'
  model and dictionary are copied from a ``t2t_recipe.py prepare`` output instead (its
  ``spm.model`` and ``data-bin/dict.<lang>.txt``), so an ST model's decoder can start from that
  text model's (``--load-pretrained-decoder-from``);
* ``config_asr.yaml`` / ``config_st.yaml``: fairseq S2T data configs that apply global CMVN to
  every split, and with ``--specaugment POLICY`` SpecAugment's masks to the train split's
  features after it (fairseq draws them afresh each time a segment is read; evaluation and the
  streaming agents never apply them).

Audio must be 16 kHz mono unless ``--resample`` (down-mix, resample). Segments shorter than
``--min-frames`` frames are skipped (and counted). Refused with a message naming the file (and
line): a missing file, non-UTF-8 text, an empty transcript or translation line, a wav shorter
than one fbank frame or holding NaN or inf. Every output file is written atomically. fairseq
reads the result with

    fairseq-train OUT --task speech_to_text --config-yaml config_st.yaml --train-subset train_st \
        --valid-subset dev_st --required-batch-size-multiple 1 ...

(fairseq 0.12 drops a last batch smaller than ``--required-batch-size-multiple``, default 8.)
"""
import argparse
import shutil
import time
import unicodedata
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import sentencepiece
import soundfile
import torch
import yaml

from leapformer_fairseq.audio import (
    FRAME_LENGTH,
    SAMPLE_RATE,
    check_finite,
    cmvn_statistics,
    fbank,
    to_int16_scale,
    to_mono_16k,
)
from leapformer_fairseq.recipes.common import (
    Recipe,
    atomic_output,
    read_lines,
    refuse_empty,
    train_sentencepiece,
    write_text,
)

COLUMNS = ("id", "audio", "n_frames", "tgt_text", "speaker")
SPECIAL_PIECES = ("<unk>", "<s>", "</s>", "<pad>")  # fairseq's Dictionary adds its own
log = Recipe("prep").log


def read_split(root: Path, split: str, lang: str) -> List[Dict]:
    """Segments of one split, each with its ``en`` and ``lang`` text, in yaml order."""
    txt = root / "data" / split / "txt"
    paths = [txt / f"{split}.yaml", txt / f"{split}.en", txt / f"{split}.{lang}"]
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"[prep] {split}: missing {path} (--data-root, --lang, --splits)")
    try:
        segments = yaml.load("\n".join(read_lines(paths[0], "prep")),
                             Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or []
    except yaml.YAMLError as error:
        raise SystemExit(f"[prep] {paths[0]}: not valid YAML ({error})".replace("\n", " "))
    sources, targets = (read_lines(path, "prep") for path in paths[1:])
    refuse_empty(sources, paths[1], "transcript line", "prep")
    refuse_empty(targets, paths[2], "translation line", "prep")
    if not len(segments) == len(sources) == len(targets):
        raise SystemExit(f"[prep] {split}: {paths[0]} has {len(segments)} segments, "
                         f"{paths[1]} {len(sources)} lines, {paths[2]} {len(targets)} lines")
    for number, segment in enumerate(segments, start=1):
        missing = {"duration", "offset", "speaker_id", "wav"} - set(segment)
        if missing:
            raise SystemExit(f"[prep] {split}: {paths[0]} segment {number} lacks {missing}")
        segment.update(en=sources[number - 1], tgt=targets[number - 1])
    return segments


def load_talk(path: Path, resample: bool) -> np.ndarray:
    """A talk's samples as 16 kHz mono floats in [-1, 1]; refused (naming the wav) unless 16 kHz
    mono or ``resample``, shorter than one fbank frame, or holding NaN or inf."""
    if not path.is_file():
        raise SystemExit(f"[prep] missing {path} (named in the split's yaml)")
    samples, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)
    try:
        check_finite(samples, str(path))
        samples = to_mono_16k(torch.from_numpy(samples.T.copy()), sample_rate, resample,
                              str(path)).numpy()
    except ValueError as error:
        raise SystemExit(f"[prep] {error}")
    if len(samples) < FRAME_LENGTH:
        raise SystemExit(f"[prep] {path}: {len(samples)} samples, shorter than one fbank frame "
                         f"({FRAME_LENGTH} samples, 25 ms)")
    return samples


def manifest_text(text: str) -> str:
    """Text for a manifest cell: fairseq reads the TSV unquoted, so no tabs."""
    return text.replace("\t", " ")


def extract_split(args, root: Path, split: str, segments: Sequence[Dict],
                  features: Path) -> List[Dict]:
    """Fbank of every segment of a split into ``features``; the manifest rows (with ``en``
    and ``tgt`` texts)."""
    talks: Dict[str, List[Dict]] = {}
    for segment in segments:
        talks.setdefault(segment["wav"], []).append(segment)
    rows, short, clipped = [], 0, 0
    started = last_log = time.time()
    for number, (wav, talk_segments) in enumerate(talks.items(), start=1):
        samples = load_talk(root / "data" / split / "wav" / wav, args.resample)
        for index, segment in enumerate(talk_segments):
            start = round(float(segment["offset"]) * SAMPLE_RATE)
            end = start + round(float(segment["duration"]) * SAMPLE_RATE)
            clipped += end > len(samples)
            frames = fbank(to_int16_scale(samples[start:end])).numpy()
            if frames.shape[0] < args.min_frames:
                short += 1
                continue
            utterance = f"{Path(wav).stem}_{index}"
            with atomic_output(features / f"{utterance}.npy") as partial:
                np.save(partial, frames.astype(np.float32))
            rows.append({"id": utterance, "audio": str((features / f"{utterance}.npy").resolve()),
                         "n_frames": frames.shape[0], "speaker": segment["speaker_id"],
                         "en": segment["en"], "tgt": segment["tgt"]})
        if time.time() - last_log > 10 or number == len(talks):
            last_log = time.time()
            log(f"{split}: {number}/{len(talks)} talks, {len(rows)} segments "
                f"({time.time() - started:.0f} s)")
    if clipped:
        log(f"{split}: {clipped} segment(s) end after their wav; cut at its end")
    if short:
        log(f"{split}: skipped {short} segment(s) shorter than {args.min_frames} frames")
    if not rows:
        raise SystemExit(f"[prep] {split}: no segment of {root / 'data' / split} kept")
    return rows


def write_manifest(rows: Sequence[Dict], target: str, path: Path) -> None:
    lines = ["\t".join(COLUMNS)]
    for row in rows:
        lines.append("\t".join(str(value) for value in (
            row["id"], row["audio"], row["n_frames"], manifest_text(row[target]),
            row["speaker"])))
    write_text(path, "\n".join(lines) + "\n")


def train_spm(texts: Sequence[str], vocab_size: int, prefix: Path, flag: str) -> None:
    """SentencePiece unigram model ``prefix.model`` and fairseq dictionary ``prefix.txt``.

    Special ids as fairseq's (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3), so a piece's id
    is its dictionary index. ``hard_vocab_limit=False`` lets a small corpus give fewer pieces
    than asked; a size below its characters + 4 specials (which SentencePiece refuses) is raised.
    """
    characters = {"▁" if char.isspace() else char
                  for text in texts for char in unicodedata.normalize("NFKC", text)}
    if vocab_size < len(characters) + len(SPECIAL_PIECES):
        log(f"{flag} {vocab_size} < {len(characters)} characters + {len(SPECIAL_PIECES)} "
            f"specials; using {len(characters) + len(SPECIAL_PIECES)}")
        vocab_size = len(characters) + len(SPECIAL_PIECES)
    train_sentencepiece(
        prefix, sentence_iterator=iter(texts), vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, hard_vocab_limit=False, bos_id=0, pad_id=1, eos_id=2, unk_id=3,
        minloglevel=2)
    model = sentencepiece.SentencePieceProcessor(model_file=f"{prefix}.model")
    pieces = [model.id_to_piece(i) for i in range(model.get_piece_size())]
    write_text(Path(f"{prefix}.txt"),
               "".join(f"{piece} 1\n" for piece in pieces if piece not in SPECIAL_PIECES))
    log(f"{prefix}.model: {len(pieces)} pieces ({flag} {vocab_size})")


def t2t_vocabulary(t2t_data: Path, lang: str) -> Tuple[Path, Path]:
    """A ``t2t_recipe.py prepare`` output's SentencePiece model and ``lang`` dictionary
    (``--st-vocab-from``), checked to be there."""
    files = (t2t_data / "spm.model", t2t_data / "data-bin" / f"dict.{lang}.txt")
    for path in files:
        if not path.is_file():
            raise SystemExit(f"[prep] --st-vocab-from {t2t_data}: {path} not found (a "
                             f"t2t_recipe.py prepare output for en-{lang} is expected)")
    return files


# SpecAugment's masks on the train features (fairseq's ``specaugment`` transform, no time warping):
# N masks of up to F of the 80 channels, N masks of up to T frames but at most p of the segment.
# "lb" and "ld" are the policies of the SpecAugment paper; "sm" and "ss" cap each time mask at a
# fifth of the segment, which suits short segments.
SPECAUGMENT_POLICIES = {
    "lb": {"freq_mask_N": 1, "freq_mask_F": 27, "time_mask_N": 1, "time_mask_T": 100,
           "time_mask_p": 1.0},
    "ld": {"freq_mask_N": 2, "freq_mask_F": 27, "time_mask_N": 2, "time_mask_T": 100,
           "time_mask_p": 1.0},
    "sm": {"freq_mask_N": 2, "freq_mask_F": 15, "time_mask_N": 2, "time_mask_T": 70,
           "time_mask_p": 0.2},
    "ss": {"freq_mask_N": 2, "freq_mask_F": 27, "time_mask_N": 2, "time_mask_T": 70,
           "time_mask_p": 0.2},
}


def write_config(out: Path, task: str, specaugment: Optional[str] = None,
                 in_folder: bool = False) -> None:
    """fairseq S2T data config ``out/config_<task>.yaml``: fbank input, the task's SentencePiece
    model, global CMVN on every split (``feature_transforms`` ``'*'``: fairseq looks a split up
    by name, then ``_train``/``_eval``, then ``'*'``), then the ``specaugment`` policy's masks on
    the train split ``train_<task>`` (named, not ``_train``, which fairseq recognises by a name
    prefix). The files it names are ``out``'s, by absolute path, or by bare file name with
    ``in_folder`` (a model folder read from wherever it lies)."""
    def named(name: str) -> str:
        return name if in_folder else str((out / name).resolve())

    transforms = {"*": ["global_cmvn"]}
    if specaugment:
        transforms = {f"train_{task}": ["global_cmvn", "specaugment"], **transforms}
    config = {
        "input_feat_per_channel": 80,
        "input_channels": 1,
        "vocab_filename": f"spm_{task}.txt",
        "bpe_tokenizer": {"bpe": "sentencepiece",
                          "sentencepiece_model": named(f"spm_{task}.model")},
        "global_cmvn": {"stats_npz_path": named("gcmvn.npz")},
        "feature_transforms": transforms,
        **({"specaugment": {"time_warp_W": 0, **SPECAUGMENT_POLICIES[specaugment]}}
           if specaugment else {}),
    }
    write_text(out / f"config_{task}.yaml", yaml.safe_dump(config, sort_keys=False))


def train_features(rows: Sequence[Dict]) -> Iterator[np.ndarray]:
    for row in rows:
        yield np.load(row["audio"])


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="MuST-C root, holding en-<lang>/")
    parser.add_argument("--lang", default="de", help="target language")
    parser.add_argument("--splits", default="train,dev,tst-COMMON",
                        help="comma-separated; must include train (CMVN, SentencePiece)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--resample", action="store_true",
                        help="down-mix and resample audio that is not 16 kHz mono "
                             "(refused otherwise)")
    parser.add_argument("--vocab-size-asr", type=int, default=5000,
                        help="SentencePiece vocabulary of the English transcripts")
    parser.add_argument("--vocab-size-st", type=int,
                        help="SentencePiece vocabulary of the translations (default 8000)")
    parser.add_argument("--st-vocab-from", metavar="T2T_DATA",
                        help="copy the translations' SentencePiece model and dictionary from "
                             "this t2t_recipe.py prepare output instead of training them")
    parser.add_argument("--specaugment", choices=sorted(SPECAUGMENT_POLICIES),
                        help="SpecAugment policy of the train split (default: none); see "
                             "docs/recipes.md")
    parser.add_argument("--min-frames", type=int, default=5,
                        help="skip segments with fewer fbank frames")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small tensors: several threads only contend (10-100x slower)
    if args.st_vocab_from and args.vocab_size_st is not None:
        raise SystemExit("[prep] --vocab-size-st and --st-vocab-from: the translations' "
                         "vocabulary is either trained or copied; pass one")
    st_vocabulary = args.st_vocab_from and t2t_vocabulary(Path(args.st_vocab_from), args.lang)
    if args.vocab_size_st is None:
        args.vocab_size_st = 8000
    splits = [split for split in args.splits.split(",") if split]
    if "train" not in splits:
        raise SystemExit(f"[prep] --splits must include train, got '{args.splits}'")
    root = Path(args.data_root) / f"en-{args.lang}"
    if not root.is_dir():
        raise SystemExit(f"[prep] {root} not found (--data-root, --lang)")
    segments = {split: read_split(root, split, args.lang) for split in splits}
    out = Path(args.out)
    features = out / "fbank80"
    features.mkdir(parents=True, exist_ok=True)

    rows: Dict[str, List[Dict]] = {}
    first_split: Dict[str, str] = {}
    for split in splits:
        log(f"{split}: {len(segments[split])} segments, fbank -> {features}")
        rows[split] = extract_split(args, root, split, segments[split], features)
        for row in rows[split]:
            if first_split.setdefault(row["id"], split) != split:
                raise SystemExit(f"[prep] {split}: segment {row['id']} is also in "
                                 f"{first_split[row['id']]}; talk wav names must be unique")
        for task, target in (("asr", "en"), ("st", "tgt")):
            write_manifest(rows[split], target, out / f"{split}_{task}.tsv")
        log(f"{split}: {len(rows[split])} segments -> {out / split}_{{asr,st}}.tsv")
    mean, std = cmvn_statistics(train_features(rows["train"]))
    with atomic_output(out / "gcmvn.npz") as partial:
        np.savez(partial, mean=mean, std=std)
    log(f"global CMVN of {len(rows['train'])} train segments -> {out / 'gcmvn.npz'}")
    for task, target, vocab_size in (("asr", "en", args.vocab_size_asr),
                                     ("st", "tgt", args.vocab_size_st)):
        if task == "st" and st_vocabulary:
            for source, suffix in zip(st_vocabulary, (".model", ".txt")):
                with atomic_output(out / f"spm_st{suffix}") as partial:
                    shutil.copyfile(source, partial)
            log(f"{out / 'spm_st'}.{{model,txt}}: copied from {args.st_vocab_from}")
        else:
            train_spm([row[target] for row in rows["train"]], vocab_size, out / f"spm_{task}",
                      f"--vocab-size-{task}")
        write_config(out, task, args.specaugment)
    log(f"done -> {out}/config_{{asr,st}}.yaml")
