"""Speech data: espeak-ng synthesis in the MuST-C layout -> prep_mustc.py -> fairseq's S2T task.

Runs the real espeak-ng, both scripts (as commands for the fixture; prep_mustc's ``main`` in this
process where a test reruns it) and fairseq's ``SpeechToTextTask`` on a tiny synthesised corpus.
:func:`build_speech_corpus` (sizes as arguments) and the ``speech_corpus`` fixture are meant for
other tests that need a small speech corpus.
"""
import json
import shutil
import subprocess
import sys
import unicodedata
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import sentencepiece
import soundfile
import torch
import torchaudio.functional
import yaml

from leapformer_fairseq.audio import SAMPLE_RATE, fbank, num_frames, to_int16_scale
from leapformer_fairseq.recipes import mustc, tts

ROOT = Path(__file__).resolve().parents[1]
MAKE_TTS_CORPUS = ROOT / "scripts" / "make_tts_corpus.py"
PREP_MUSTC = ROOT / "scripts" / "prep_mustc.py"
TSV = ROOT / "data" / "gettext-mt" / "en-de.{split}.tsv"
SPLITS = {"train": "train", "valid": "dev", "test": "tst-COMMON"}  # corpus -> MuST-C


@dataclass
class SpeechCorpus:
    """A synthesised corpus: ``mustc`` holds ``en-<tgt>/data/...``, ``prep`` the fairseq data."""
    mustc: Path
    prep: Path
    sizes: Dict[str, int]  # MuST-C split -> utterances
    per_talk: int
    tgt: str = "de"

    def txt(self, split: str, suffix: str) -> Path:
        return self.mustc / f"en-{self.tgt}" / "data" / split / "txt" / f"{split}.{suffix}"

    def wav(self, split: str, name: str) -> Path:
        return self.mustc / f"en-{self.tgt}" / "data" / split / "wav" / name


def run_script(script: Path, *arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *map(str, arguments)],
                          capture_output=True, text=True, timeout=300)


def prep_arguments(data_root: Path, out: Path, *options) -> List[str]:
    return [str(argument) for argument in (
        "--data-root", data_root, "--lang", "de", "--out", out, "--vocab-size-asr", 200,
        "--vocab-size-st", 200, *options)]


def build_speech_corpus(root: Path, train: int = 12, valid: int = 4, test: int = 4,
                        per_talk: int = 4, jobs: int = 4) -> SpeechCorpus:
    """Synthesise the first ``train``/``valid``/``test`` en-de gettext-mt pairs into
    ``root/mustc`` and prepare them into ``root/prep``; fails the test if a script fails."""
    done = run_script(MAKE_TTS_CORPUS, "--corpus", TSV, "--src", "en", "--tgt", "de",
                      "--out", root / "mustc", "--max-train", train, "--max-valid", valid,
                      "--max-test", test, "--per-talk", per_talk, "--jobs", jobs)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    done = run_script(PREP_MUSTC, *prep_arguments(root / "mustc", root / "prep"))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    sizes = {"train": train, "dev": valid, "tst-COMMON": test, tts.HELDOUT_SPLIT: test}
    return SpeechCorpus(root / "mustc", root / "prep", sizes, per_talk)


def prep_in_process(data_root: Path, out: Path, *options) -> None:
    """prep_mustc.py's ``main`` in this process: quicker than the command, which the fixture
    runs; a refusal raises its ``SystemExit``."""
    mustc.main(prep_arguments(data_root, out, *options))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def speech_corpus(tmp_path_factory) -> SpeechCorpus:
    return build_speech_corpus(tmp_path_factory.mktemp("speech"))


def segments(corpus: SpeechCorpus, split: str) -> List[Tuple[str, int, int, str]]:
    """(wav name, first sample, end sample, speaker) of every yaml segment, in order."""
    with open(corpus.txt(split, "yaml"), encoding="utf-8") as file:
        entries = yaml.safe_load(file)
    starts = [round(entry["offset"] * SAMPLE_RATE) for entry in entries]
    return [(entry["wav"], start, start + round(entry["duration"] * SAMPLE_RATE),
             entry["speaker_id"]) for entry, start in zip(entries, starts)]


def read_manifest(path: Path) -> List[Dict[str, str]]:
    header, *lines = path.read_text(encoding="utf-8").splitlines()
    return [dict(zip(header.split("\t"), line.split("\t"))) for line in lines]


def spm_normalised(text: str) -> str:
    """``text`` as SentencePiece's ``nmt_nfkc`` gives it back (NFKC, whitespace collapsed)."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def tsv_pairs(split: str, count: int) -> List[List[str]]:
    lines = Path(str(TSV).format(split=split)).read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[1:] for line in lines[1:count + 1]]


def test_talk_wavs_are_16k_mono_int16(speech_corpus):
    for split, size in speech_corpus.sizes.items():
        names = sorted({wav for wav, *_ in segments(speech_corpus, split)})
        assert len(names) == -(-size // speech_corpus.per_talk)
        for name in names:
            info = soundfile.info(speech_corpus.wav(split, name))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")


def test_text_lines_follow_the_corpus(speech_corpus):
    for corpus_split, split in SPLITS.items():
        pairs = tsv_pairs(corpus_split, speech_corpus.sizes[split])
        for side, index in (("en", 0), ("de", 1)):
            lines = speech_corpus.txt(split, side).read_text(encoding="utf-8").splitlines()
            assert lines == [pair[index].strip() for pair in pairs]


def speaker_voices(corpus: SpeechCorpus, split: str) -> set:
    """The espeak-ng voices of a split's segments (``speaker_id`` is ``<voice>_<speed>``)."""
    return {speaker.rsplit("_", 1)[0] for *_, speaker in segments(corpus, split)}


def test_heldout_split_is_the_test_pairs_in_voices_the_other_splits_never_use(speech_corpus):
    settings = json.loads((speech_corpus.mustc / "en-de" / tts.MARKER).read_text())
    heldout = speaker_voices(speech_corpus, tts.HELDOUT_SPLIT)
    heard = set().union(*(speaker_voices(speech_corpus, split) for split in tts.SPLITS.values()))
    assert heldout <= set(settings["heldout_voices"]) and heard <= set(settings["voices"])
    assert heldout and not heldout & heard
    for side in ("en", "de"):
        assert speech_corpus.txt(tts.HELDOUT_SPLIT, side).read_text(encoding="utf-8") == \
            speech_corpus.txt("tst-COMMON", side).read_text(encoding="utf-8")
    for split, size in settings["size"].items():  # hours of audio: every talk wav's length
        wavs = {wav for wav, *_ in segments(speech_corpus, split)}
        frames = sum(soundfile.info(speech_corpus.wav(split, wav)).frames for wav in wavs)
        assert size["hours"] == pytest.approx(frames / SAMPLE_RATE / 3600, abs=1e-3)
        assert size["hours"] > 0


def test_segments_lie_inside_their_talk_in_order(speech_corpus):
    for split, size in speech_corpus.sizes.items():
        rows = segments(speech_corpus, split)
        assert len(rows) == size
        for talk in range(0, size, speech_corpus.per_talk):
            group = rows[talk:talk + speech_corpus.per_talk]
            assert len({wav for wav, *_ in group}) == 1  # consecutive utterances, one talk
            assert len({speaker for *_, speaker in group}) == 1  # one voice and speed
            length = soundfile.info(speech_corpus.wav(split, group[0][0])).frames
            previous_end = 0
            for _, start, end, _ in group:
                assert previous_end < start < end <= length  # pauses between, inside the wav
                previous_end = end
            assert previous_end < length


def test_manifests_hold_the_fbank_of_each_segment(speech_corpus):
    for corpus_split, split in SPLITS.items():
        pairs = tsv_pairs(corpus_split, speech_corpus.sizes[split])
        asr = read_manifest(speech_corpus.prep / f"{split}_asr.tsv")
        st = read_manifest(speech_corpus.prep / f"{split}_st.tsv")
        assert [row["tgt_text"] for row in asr] == [pair[0].strip() for pair in pairs]
        assert [row["tgt_text"] for row in st] == [pair[1].strip() for pair in pairs]
        assert [row["id"] for row in asr] == [row["id"] for row in st]
        talks = {}
        for row, (wav, start, end, speaker) in zip(st, segments(speech_corpus, split)):
            if wav not in talks:
                talks[wav] = soundfile.read(speech_corpus.wav(split, wav), dtype="float32")[0]
            samples = talks[wav][start:end]
            expected = fbank(to_int16_scale(samples)).numpy()
            features = np.load(row["audio"])
            assert Path(row["audio"]).is_absolute()
            assert row["speaker"] == speaker
            assert int(row["n_frames"]) == num_frames(len(samples)) == features.shape[0]
            assert features.dtype == np.float32 and features.shape[1] == 80
            np.testing.assert_allclose(features, expected, rtol=0, atol=1e-5)


def test_gcmvn_normalises_the_train_features(speech_corpus):
    stats = np.load(speech_corpus.prep / "gcmvn.npz")
    frames = np.concatenate([np.load(row["audio"]) for row in
                             read_manifest(speech_corpus.prep / "train_st.tsv")])
    normalised = (frames - stats["mean"]) / stats["std"]
    np.testing.assert_allclose(normalised.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(normalised.std(axis=0), 1.0, atol=1e-3)


@pytest.mark.parametrize("task", ["asr", "st"])
def test_sentencepiece_models_and_dictionaries(speech_corpus, task):
    model = sentencepiece.SentencePieceProcessor(
        model_file=str(speech_corpus.prep / f"spm_{task}.model"))
    pieces = [line.split(" ") for line in
              (speech_corpus.prep / f"spm_{task}.txt").read_text(encoding="utf-8").splitlines()]
    assert [model.id_to_piece(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert pieces == [[model.id_to_piece(i), "1"] for i in range(4, model.get_piece_size())]
    for row in read_manifest(speech_corpus.prep / f"train_{task}.tsv"):
        ids = model.encode(row["tgt_text"])
        assert ids and model.unk_id() not in ids
        assert model.decode(ids) == spm_normalised(row["tgt_text"])


@pytest.mark.parametrize("task", ["asr", "st"])
def test_fairseq_task_loads_normalised_features(speech_corpus, task):
    from fairseq import tasks

    fairseq_task = tasks.setup_task(Namespace(
        task="speech_to_text", data=str(speech_corpus.prep), config_yaml=f"config_{task}.yaml",
        multitask_config_yaml=None, max_source_positions=6000, max_target_positions=1024,
        seed=1))
    stats = np.load(speech_corpus.prep / "gcmvn.npz")
    bpe = fairseq_task.build_bpe(None)
    for split in (f"train_{task}", f"dev_{task}"):  # CMVN on train and evaluation splits
        fairseq_task.load_dataset(split)
        dataset = fairseq_task.datasets[split]
        row = read_manifest(speech_corpus.prep / f"{split}.tsv")[0]
        item = dataset[0]
        expected = (np.load(row["audio"]) - stats["mean"]) / stats["std"]
        torch.testing.assert_close(item.source, torch.from_numpy(expected))
        if split.startswith("train"):  # evaluation text may have characters train lacks
            text = fairseq_task.target_dictionary.string(item.target[:-1])
            assert bpe.decode(text) == spm_normalised(row["tgt_text"])


def test_specaugment_masks_the_train_features_only(speech_corpus, tmp_path):
    """``--specaugment lb``: fairseq's S2T task reads the train split with masks drawn afresh
    on every read (whole channel bands and whole frame spans set to one value, the segment's
    mean; the rest unchanged), the dev split as without the option; ASR and ST alike."""
    from fairseq import tasks

    out = tmp_path / "prep"
    prep_in_process(speech_corpus.mustc, out, "--specaugment", "lb")
    stats = np.load(out / "gcmvn.npz")
    for task in ("asr", "st"):
        config = yaml.safe_load((out / f"config_{task}.yaml").read_text(encoding="utf-8"))
        assert config["specaugment"] == {"time_warp_W": 0, **mustc.SPECAUGMENT_POLICIES["lb"]}
        fairseq_task = tasks.setup_task(Namespace(
            task="speech_to_text", data=str(out), config_yaml=f"config_{task}.yaml",
            multitask_config_yaml=None, max_source_positions=6000, max_target_positions=1024,
            seed=1))
        for split in (f"train_{task}", f"dev_{task}"):
            fairseq_task.load_dataset(split)
            row = read_manifest(out / f"{split}.tsv")[0]
            plain = torch.from_numpy((np.load(row["audio"]) - stats["mean"]) / stats["std"])
            reads = []
            for seed in range(4):
                np.random.seed(seed)
                reads.append(fairseq_task.datasets[split][0].source)
            if split.startswith("dev"):
                for source in reads:
                    torch.testing.assert_close(source, plain)
                continue
            assert not all(torch.equal(reads[0], source) for source in reads[1:])  # fresh
            for source in reads:
                changed = source != plain
                rows, columns = changed.all(dim=1), changed.all(dim=0)
                assert torch.equal(changed, rows[:, None] | columns[None, :])  # bands, spans
                torch.testing.assert_close(source[changed],
                                           plain.mean().expand(int(changed.sum())))
                assert rows.sum() <= 100 and columns.sum() < 27  # time_mask_T, freq_mask_F


def test_st_vocabulary_from_a_t2t_prepare_output(speech_corpus, tmp_path):
    """``--st-vocab-from``: the translations' SentencePiece model and dictionary are the text
    model's (``t2t_recipe.py prepare``, run here), and fairseq's S2T task reads them."""
    from fairseq import tasks
    from fairseq.data import Dictionary

    t2t = tmp_path / "t2t"
    done = run_script(ROOT / "scripts" / "t2t_recipe.py", "prepare", "--corpus", TSV,
                      "--out", t2t, "--vocab-size", 300, "--max-train", 200, "--max-valid", 20,
                      "--max-test", 20)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    out = tmp_path / "prep"
    mustc.main([str(argument) for argument in (
        "--data-root", speech_corpus.mustc, "--lang", "de", "--out", out,
        "--vocab-size-asr", 200, "--st-vocab-from", t2t)])
    assert (out / "spm_st.model").read_bytes() == (t2t / "spm.model").read_bytes()
    assert (out / "spm_st.txt").read_bytes() == (t2t / "data-bin" / "dict.de.txt").read_bytes()
    assert (out / "spm_asr.txt").read_bytes() == (speech_corpus.prep / "spm_asr.txt").read_bytes()
    fairseq_task = tasks.setup_task(Namespace(
        task="speech_to_text", data=str(out), config_yaml="config_st.yaml",
        multitask_config_yaml=None, max_source_positions=6000, max_target_positions=1024,
        seed=1))
    t2t_dictionary = Dictionary.load(str(t2t / "data-bin" / "dict.de.txt"))
    assert fairseq_task.target_dictionary.symbols == t2t_dictionary.symbols
    fairseq_task.load_dataset("train_st")
    row = read_manifest(out / "train_st.tsv")[0]
    text = fairseq_task.target_dictionary.string(fairseq_task.datasets["train_st"][0].target[:-1])
    assert fairseq_task.build_bpe(None).decode(text) == spm_normalised(row["tgt_text"])


def test_st_vocabulary_is_trained_or_copied_not_both(speech_corpus, tmp_path):
    with pytest.raises(SystemExit, match="--vocab-size-st and --st-vocab-from"):
        prep_in_process(speech_corpus.mustc, tmp_path / "prep", "--st-vocab-from", tmp_path)
    with pytest.raises(SystemExit, match=r"--st-vocab-from .*t2t: .*t2t/spm.model not found"):
        mustc.main([str(argument) for argument in (
            "--data-root", speech_corpus.mustc, "--lang", "de", "--out", tmp_path / "prep",
            "--st-vocab-from", tmp_path / "t2t")])
    assert not (tmp_path / "prep").exists()  # refused before any work


def test_other_rates_are_refused_without_resample(speech_corpus, tmp_path):
    """A corpus copy with one talk at 22.05 kHz stereo: refused naming that wav, accepted
    (and resampled) with --resample."""
    copy = tmp_path / "mustc"
    shutil.copytree(speech_corpus.mustc, copy)
    name = segments(speech_corpus, "train")[speech_corpus.per_talk][0]  # the second talk
    changed = copy / f"en-{speech_corpus.tgt}" / "data" / "train" / "wav" / name
    samples, _ = soundfile.read(changed, dtype="float32")
    resampled = torchaudio.functional.resample(torch.from_numpy(samples), SAMPLE_RATE, 22050)
    soundfile.write(changed, torch.stack([resampled, 0.5 * resampled], dim=1).numpy(), 22050,
                    subtype="PCM_16")

    with pytest.raises(SystemExit) as refused:
        prep_in_process(copy, tmp_path / "refused")
    assert f"{changed}: 2 channel(s) at 22050 Hz" in str(refused.value)
    assert "--resample" in str(refused.value)

    prep_in_process(copy, tmp_path / "prep", "--resample")
    original = read_manifest(speech_corpus.prep / "train_st.tsv")
    resampled_rows = read_manifest(tmp_path / "prep" / "train_st.tsv")
    assert [row["id"] for row in resampled_rows] == [row["id"] for row in original]
    for before, after in zip(original, resampled_rows):
        if before["id"].startswith(Path(name).stem + "_"):
            assert abs(int(after["n_frames"]) - int(before["n_frames"])) <= 1
        else:
            assert after["n_frames"] == before["n_frames"]
            np.testing.assert_array_equal(np.load(after["audio"]), np.load(before["audio"]))


def test_short_segments_are_skipped_and_counted(speech_corpus, tmp_path, capsys):
    train = read_manifest(speech_corpus.prep / "train_st.tsv")
    shortest = min(int(row["n_frames"]) for row in train)
    prep_in_process(speech_corpus.mustc, tmp_path, "--min-frames", shortest + 1)
    kept = read_manifest(tmp_path / "train_st.tsv")
    assert [row["id"] for row in kept] == [row["id"] for row in train
                                           if int(row["n_frames"]) > shortest]
    assert f"skipped {len(train) - len(kept)} segment(s) shorter than {shortest + 1} frames" \
        in capsys.readouterr().out
