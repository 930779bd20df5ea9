"""Every bad input gets one clear line (docs/errors.md): one test per row of its table.

Real components throughout: the recipes' own functions (``leapformer_fairseq.recipes``, in this
process, so a refusal is its ``SystemExit``), fairseq's parser and checkpoint loader, and the
``simuleval`` CLI where the row is about what a user of the CLI sees. The models are tiny and
hold random weights (saved as fairseq checkpoints here); no assertion depends on what they emit
beyond "the same input gives the same output".
"""
import argparse
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import pytest
import soundfile
import torch

import leapformer_fairseq  # noqa: F401  (registers the models)
from leapformer_fairseq.audio import FRAME_LENGTH, SAMPLE_RATE
from leapformer_fairseq.models.attention_config import resolve_attention_types
from leapformer_fairseq.models.streaming import RefusedInput, load_streaming_model
from leapformer_fairseq.pieces import load_sentencepiece
from leapformer_fairseq.recipes import common, s2t, t2t, tts
from leapformer_fairseq.recipes.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "leapformer_fairseq"
SPEECH_AGENT = ROOT / "simuleval_agents" / "leap_waitk_speech_agent.py"
TEXT_AGENT = ROOT / "simuleval_agents" / "leap_waitk_text_agent.py"
PREP_MUSTC = ROOT / "scripts" / "prep_mustc.py"
MAKE_TTS = ROOT / "scripts" / "make_tts_corpus.py"
T2T_RECIPE = ROOT / "scripts" / "t2t_recipe.py"
S2T_RECIPE = ROOT / "scripts" / "s2t_recipe.py"
TSV = ROOT / "data" / "gettext-mt" / "en-de.{split}.tsv"
LONG_SOURCE = " ".join(["information"] * 100)  # more pieces than --max-source-positions 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tsv_pairs(split: str, count: int, max_chars: int = 40) -> List[List[str]]:
    """The first ``count`` gettext-mt pairs of ``split`` with both sides under ``max_chars``."""
    lines = Path(str(TSV).format(split=split)).read_text(encoding="utf-8").splitlines()
    pairs = [line.split("\t")[1:] for line in lines[1:]]
    return [pair for pair in pairs if max(map(len, pair)) < max_chars][:count]


def refusal(function, *args) -> str:
    """The message of the ``SystemExit`` that ``function(*args)`` raises."""
    with pytest.raises(SystemExit) as refused:
        function(*args)
    return str(refused.value.code)


def run_script(script: Path, arguments: Sequence) -> None:
    """A script's ``__main__`` in this process, with ``arguments`` as its command line."""
    argv = sys.argv
    sys.argv = [str(script), *map(str, arguments)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv


def cli_refusal(script: Path, arguments: Sequence, env: dict = None) -> str:
    """``script`` run as a command that must refuse: exit code 1 and no traceback. Returns the
    last line of its stderr, the message (a ``SystemExit`` with a message is what Python turns
    into exactly this; importing fairseq logs a line to stderr before)."""
    done = subprocess.run([sys.executable, str(script), *map(str, arguments)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


def simuleval_cli(*arguments, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simuleval.cli", *map(str, arguments)],
                          cwd=cwd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def save_random_checkpoint(path: Path, argv: Sequence) -> Path:
    """A fairseq checkpoint of the model that ``fairseq-train argv`` would build, with its
    random initial weights."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(),
                                       [*map(str, argv), "--user-dir", str(PLUGIN)])
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(1)
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    torch.save({"cfg": cfg, "model": model.state_dict(), "extra_state": {},
                "last_optimizer_state": None,
                "optimizer_history": [{"criterion_name": "CrossEntropyCriterion",
                                       "optimizer_name": "Adam", "lr_scheduler_state": {},
                                       "num_updates": 0}]}, path)
    return path


# ---------------------------------------------------------------------------------- text
@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """t2t prepare on plain files: 30 train and 5 valid short pairs from gettext-mt, each split
    with one extra pair whose source is longer than 64 pieces, and 4 test pairs."""
    root = tmp_path_factory.mktemp("t2t")
    for split, count in (("train", 30), ("valid", 5), ("test", 4)):
        pairs = tsv_pairs(split, count) + ([[LONG_SOURCE, "Information."]]
                                           if split != "test" else [])
        for side, index in (("en", 0), ("de", 1)):
            (root / f"corpus.{split}.{side}").write_text(
                "".join(pair[index] + "\n" for pair in pairs), encoding="utf-8")
    t2t.prepare(argparse.Namespace(
        corpus=None, plain_prefix=str(root / "corpus"), src="en", tgt="de",
        out=str(root / "data"), vocab_size=200, max_train=0, max_valid=0, max_test=0))
    return root / "data"


WAITK_TEXT = ["--task", "translation", "--arch", "leapformer_waitk_transformer_tiny",
              "--waitk-lagging", "2", "--share-all-embeddings"]


@pytest.fixture(scope="module")
def text_checkpoint(text_data) -> Path:
    folder = text_data / "runs" / "leap_k2"
    folder.mkdir(parents=True)
    return save_random_checkpoint(folder / "checkpoint_last.pt",
                                  [text_data / "data-bin", *WAITK_TEXT])


def plain_corpus(root: Path, sources: List[str], targets: List[str]) -> argparse.Namespace:
    """Plain files with ``sources``/``targets`` in every split, and the prepare options."""
    for split in t2t.SPLITS:
        (root / f"c.{split}.en").write_text("".join(s + "\n" for s in sources), encoding="utf-8")
        (root / f"c.{split}.de").write_text("".join(t + "\n" for t in targets), encoding="utf-8")
    return argparse.Namespace(corpus=None, plain_prefix=str(root / "c"), src="en", tgt="de",
                              out=str(root / "out"), vocab_size=50, max_train=0, max_valid=0,
                              max_test=0)


def test_t2t_prepare_refuses_an_empty_source_or_target_line(tmp_path):
    args = plain_corpus(tmp_path, ["Open the file.", "", "Save it."], ["a", "b", "c"])
    assert refusal(t2t.prepare, args) == \
        f"[t2t] {tmp_path / 'c.train.en'}:2: empty source line"
    args = plain_corpus(tmp_path, ["Open the file.", "Close it.", "Save it."], ["a", "b", " "])
    assert refusal(t2t.prepare, args) == \
        f"[t2t] {tmp_path / 'c.train.de'}:3: empty target line"
    tsv = tmp_path / "corpus.train.tsv"
    tsv.write_text("domain\ten\tde\nkde\tOpen\tÖffnen\nkde\tClose\t\n", encoding="utf-8")
    args = argparse.Namespace(corpus=str(tmp_path / "corpus.{split}.tsv"), plain_prefix=None,
                              src="en", tgt="de")
    assert refusal(t2t.read_pairs, args, "train") == \
        f"[t2t] {tsv}:3: empty target field (de)"
    assert not (tmp_path / "out" / "train.en").exists()


def test_t2t_prepare_refuses_non_utf8_text_naming_file_and_line(tmp_path):
    args = plain_corpus(tmp_path, ["Open the file.", "Close it."], ["a", "b"])
    (tmp_path / "c.train.de").write_bytes("Öffnen\n".encode("utf-8") + "Schließen\n".encode(
        "latin-1"))
    assert refusal(t2t.prepare, args).startswith(
        f"[t2t] {tmp_path / 'c.train.de'}:2: not UTF-8")


def test_t2t_prepare_refuses_a_missing_file_a_wrong_header_or_field_count(tmp_path):
    """Through the command: one line on stderr naming the file (and line, and flag), exit 1,
    nothing written."""
    out = tmp_path / "out"
    corpus = ["prepare", "--corpus", tmp_path / "c.{split}.tsv", "--out", out]
    tsv = tmp_path / "c.train.tsv"
    assert cli_refusal(T2T_RECIPE, corpus) == \
        f"[t2t] prepare: missing {tsv} (--corpus with {{split}})"
    tsv.write_text("domain\ten\tfr\nkde\tOpen\tOuvrir\n", encoding="utf-8")
    assert cli_refusal(T2T_RECIPE, corpus) == (
        f"[t2t] prepare: {tsv} header is ['domain', 'en', 'fr'], expected columns 'en' (--src) "
        "and 'de' (--tgt)")
    tsv.write_text("domain\ten\tde\nkde\tOpen\tÖffnen\nkde\tClose\n", encoding="utf-8")
    assert cli_refusal(T2T_RECIPE, corpus) == f"[t2t] prepare: {tsv}:3 has 2 fields, not 3"

    plain = ["prepare", "--plain-prefix", tmp_path / "p", "--out", out]
    (tmp_path / "p.train.en").write_text("Open\nClose\n", encoding="utf-8")
    assert cli_refusal(T2T_RECIPE, plain) == \
        f"[t2t] prepare: missing {tmp_path / 'p.train.de'} (--plain-prefix)"
    (tmp_path / "p.train.de").write_text("Öffnen\n", encoding="utf-8")
    assert cli_refusal(T2T_RECIPE, plain) == \
        f"[t2t] prepare: {tmp_path / 'p.train.en'} has 2 lines, {tmp_path / 'p.train.de'} has 1"
    assert list(out.iterdir()) == []


def test_tts_corpus_refuses_empty_fields_and_non_utf8(tmp_path):
    tsv = tmp_path / "c.train.tsv"
    tsv.write_text("domain\ten\tde\nkde\tOpen\tÖffnen\nkde\t \tSchließen\n", encoding="utf-8")
    pattern = str(tmp_path / "c.{split}.tsv")
    arguments = (pattern, "train", "en", "de", "tts", "read")
    assert refusal(common.read_tsv_pairs, *arguments) == f"[tts] {tsv}:3: empty source field (en)"
    tsv.write_bytes(b"domain\ten\tde\nkde\tOpen\t\xd6ffnen\n")
    assert refusal(common.read_tsv_pairs, *arguments).startswith(f"[tts] {tsv}:2: not UTF-8")
    for bad in (str(tmp_path / "c.{split.tsv}"), str(tmp_path / "c.{}.tsv")):
        assert refusal(common.read_tsv_pairs, bad, *arguments[1:]) == \
            f"[tts] read: --corpus {bad!r} is not a path pattern with {{split}} (and no other " \
            "braces)"


def tts_corpus(root: Path) -> str:
    """Two pairs per split in gettext-mt TSVs under ``root``; their ``--corpus`` pattern."""
    for split in ("train", "valid", "test"):
        (root / f"c.{split}.tsv").write_text("domain\ten\tde\nkde\tOpen\tÖffnen\n"
                                             "kde\tClose\tSchließen\n", encoding="utf-8")
    return str(root / "c.{split}.tsv")


def test_tts_corpus_refuses_unknown_voices_and_an_out_it_did_not_write(tmp_path):
    """The real espeak-ng judges the voices; an existing split folder without the script's
    marker file is left as it is."""
    out = tmp_path / "out"
    options = ["--corpus", tts_corpus(tmp_path), "--out", out]
    message = refusal(run_script, MAKE_TTS, [*options, "--voices", "en-us,xx"])
    assert message.startswith("[tts] --voices: espeak-ng does not know voice 'xx' (see "
                              "espeak-ng --voices=en): ")
    assert "\n" not in message
    assert refusal(run_script, MAKE_TTS, [*options, "--voices", "en-us+nosuchvariant"]) == \
        "[tts] --voices: espeak-ng has no variant 'nosuchvariant' (see espeak-ng --voices=variant)"
    assert refusal(run_script, MAKE_TTS, [*options, "--voices", "en-us,en-gb",
                                          "--heldout-voices", "en-us-nyc,en-gb"]) == (
        "[tts] --heldout-voices: en-gb is in --voices too; a held-out voice is one the training "
        "never hears")
    assert refusal(run_script, MAKE_TTS, [*options, "--heldout-voices", "xx"]).startswith(
        "[tts] --heldout-voices: espeak-ng does not know voice 'xx'")
    assert refusal(run_script, MAKE_TTS, [*options, "--splits", "tst-COMMON,test"]) == \
        "[tts] --splits: test; choose from train,dev,tst-COMMON,tst-HE"
    train = out / "en-de" / "data" / "train"
    train.mkdir(parents=True)
    (train / "notes.txt").write_text("mine\n")
    assert refusal(run_script, MAKE_TTS, [*options, "--voices", "en-us"]) == (
        f"[tts] {train} exists and was not written by this script (no "
        f"{out / 'en-de' / tts.MARKER}); choose another --out")
    assert (train / "notes.txt").read_text() == "mine\n"
    assert sorted(path.name for path in (out / "en-de").iterdir()) == ["data"]


def test_tts_corpus_without_espeak_ng_exits_with_one_line(tmp_path):
    """Through the command, with a PATH that holds no espeak-ng (python by its absolute path)."""
    (tmp_path / "bin").mkdir()
    assert cli_refusal(MAKE_TTS, ["--corpus", tts_corpus(tmp_path), "--out", tmp_path / "out"],
                       env={"PATH": str(tmp_path / "bin")}) == \
        "[tts] espeak-ng not found on PATH; install it (apt-get install espeak-ng)"
    assert not (tmp_path / "out").exists()


def test_training_skips_and_counts_sources_over_max_source_positions(text_data, capsys):
    """One train and one valid source exceed --max-source-positions 64: fairseq-train (with the
    recipe's --skip-invalid-size-inputs-valid-test) skips them and the recipe reports both."""
    config = load_config("t2t/small")  # LeaP, wait-3
    for key, value in (("arch", "leapformer_waitk_transformer_tiny"), ("warmup-updates", 1),
                       ("max-tokens", 2048), ("max-update", 1), ("cpu", True),
                       ("max-source-positions", 64), ("max-target-positions", 64),
                       ("required-batch-size-multiple", 1)):
        config.set(key, value, "this test")
    t2t.train(text_data, config)
    out = capsys.readouterr().out
    log = text_data / "runs" / "leap_k3" / "train.log"
    for subset in ("train", "valid"):
        assert f"train leap wait-3: skipped 1 {subset} sample(s) longer than " \
               f"max_positions=(64, 64) (--max-source-positions, --max-target-positions); " \
               f"see {log}" in out
    assert (text_data / "runs" / "leap_k3" / "checkpoint_last.pt").is_file()


def test_agent_with_a_missing_checkpoint_exits_with_one_line(text_data, tmp_path):
    """Through the simuleval CLI: the last stderr line is the message, with no traceback."""
    missing = tmp_path / "nowhere.pt"
    (tmp_path / "src.txt").write_text("Open the file.\n")
    done = simuleval_cli("--agent", TEXT_AGENT, "--source", tmp_path / "src.txt", "--target",
                         tmp_path / "src.txt", "--checkpoint", missing, "--data-bin",
                         text_data / "data-bin", "--spm", text_data / "spm.model",
                         "--output", tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"checkpoint not found: {missing}"
    assert "Traceback" not in done.stderr


def test_truncated_or_foreign_checkpoints_are_refused(text_data, text_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(text_checkpoint.read_bytes()[:5000])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    weights = tmp_path / "state_dict.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, weights)
    for path in (truncated, text, weights):
        with pytest.raises(RefusedInput) as refused:
            load_streaming_model(str(path), str(text_data / "data-bin"))
        assert str(refused.value).startswith(f"{path}: not a readable fairseq checkpoint (")
        assert "\n" not in str(refused.value)
        assert isinstance(refused.value, SystemExit)  # uncaught in an agent: one line, exit 1


def test_offline_checkpoint_is_refused(text_data, tmp_path):
    offline = save_random_checkpoint(tmp_path / "offline.pt", [
        text_data / "data-bin", "--task", "translation", "--arch", "leapformer_transformer_tiny",
        "--share-all-embeddings"])
    with pytest.raises(RefusedInput, match="leapformer_waitk_transformer") as refused:
        load_streaming_model(str(offline), str(text_data / "data-bin"))
    assert str(refused.value).startswith(f"{offline} holds a LeaPformerTransformerModel, not a "
                                         "simultaneous model")


def test_missing_dictionary_or_sentencepiece_model_is_refused(text_data, text_checkpoint,
                                                              tmp_path):
    with pytest.raises(RefusedInput) as refused:
        load_streaming_model(str(text_checkpoint), str(tmp_path / "nowhere"))
    assert str(refused.value) == f"data directory not found: {tmp_path / 'nowhere'}"
    with pytest.raises(RefusedInput) as refused:
        load_streaming_model(str(text_checkpoint), str(tmp_path))
    assert str(refused.value) == f"no fairseq data (train.<src>-<tgt>.<lang>.idx) in {tmp_path}"
    for path in (text_data / "data-bin").iterdir():
        if path.name != "dict.de.txt":
            (tmp_path / path.name).symlink_to(path)
    with pytest.raises(RefusedInput) as refused:
        load_streaming_model(str(text_checkpoint), str(tmp_path))
    assert str(refused.value) == f"dictionary not found: {tmp_path / 'dict.de.txt'}"
    with pytest.raises(RefusedInput) as refused:
        load_sentencepiece(str(tmp_path / "spm.model"), "--spm")
    assert str(refused.value) == f"--spm: SentencePiece model not found: {tmp_path / 'spm.model'}"
    (tmp_path / "bad.model").write_text("not a model\n")
    with pytest.raises(RefusedInput, match=f"^--spm: {tmp_path / 'bad.model'} is not a "
                                           "SentencePiece model"):
        load_sentencepiece(str(tmp_path / "bad.model"), "--spm")


def test_t2t_evaluate_reports_a_run_that_wrote_nothing(text_data, text_checkpoint, tmp_path):
    """wait-1000 on 4-sentence sources never writes before the end, and --max-len-b 1 makes
    the first token EOS: SimulEval's latency scorers would die with StatisticsError."""
    output = tmp_path / "eval"
    message = refusal(t2t.simuleval, text_data, text_checkpoint, output, 1000, 0,
                      ["--max-len-a", "0", "--max-len-b", "1"])
    assert message == (f"[t2t] simuleval wait-1000 leap_k2: {output / 'instances.log'}: the "
                       "agent wrote nothing for any of its 4 instances, so there is no latency "
                       "to score")


# -------------------------------------------------------------------------- attention flags
def parse_training_args(*flags) -> argparse.Namespace:
    from fairseq import options

    return options.parse_args_and_arch(options.get_training_parser(), [
        "data", "--user-dir", str(PLUGIN), "--task", "translation", "--arch",
        "leapformer_waitk_transformer_tiny", *flags])


@pytest.mark.parametrize("flag, value", [("--leap-factor", "0"), ("--leap-eps", "0"),
                                         ("--leap-eps", "-0.5"),
                                         ("--cosformer-max-positions", "0")])
def test_zero_or_negative_attention_options_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit):
        parse_training_args("--waitk-lagging", "2", flag, value)
    assert f"argument {flag}: {flag} must be > 0, got {float(value) if 'eps' in flag else value}" \
        in capsys.readouterr().err
    option = flag[2:].replace("-", "_")
    with pytest.raises(ValueError, match=f"^{flag} must be > 0"):
        resolve_attention_types(argparse.Namespace(**{option: float(value)}))
    args = argparse.Namespace()
    resolve_attention_types(args)  # unset: the defaults
    assert (args.leap_factor, args.leap_eps, args.cosformer_max_positions) == (4, 0.1, 1024)


def test_unknown_attn_type_and_waitk_below_one_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_training_args("--encoder-attn-type", "fast")
    assert "argument --encoder-attn-type: invalid choice: 'fast'" in capsys.readouterr().err
    from leapformer_fairseq.models import LeaPformerWaitkTransformerModel

    with pytest.raises(ValueError, match="--waitk-lagging must be an integer >= 1, a range such as "
                                         "1-9 or a list such as 1,3,5; got 0"):
        LeaPformerWaitkTransformerModel.prepare_args(parse_training_args("--waitk-lagging", "0"))


# -------------------------------------------------------------------------------- speech
def write_wav(path: Path, samples: np.ndarray, subtype: str = "PCM_16") -> Path:
    soundfile.write(path, samples, SAMPLE_RATE, subtype=subtype)
    return path


def noise(seconds: float, seed: int) -> np.ndarray:
    """int16-exact float samples (so a PCM_16 wav stores them unchanged)."""
    values = np.random.default_rng(seed).integers(-3000, 3000, round(seconds * SAMPLE_RATE))
    return (values / 32768.0).astype(np.float32)


def mustc_tree(root: Path, splits: Sequence[Tuple[str, str]] = (("train", "train"),
                                                                ("dev", "valid")),
               segments: int = 3) -> Path:
    """A MuST-C layout under ``root``: per (MuST-C split, gettext-mt split) of ``splits``, one
    talk of ``segments`` noise segments of 0.8 s, the gettext-mt pairs as their text."""
    for split, corpus_split in splits:
        folder = root / "en-de" / "data" / split
        (folder / "wav").mkdir(parents=True)
        (folder / "txt").mkdir(parents=True)
        write_wav(folder / "wav" / f"{split}.wav", noise(float(segments), len(split)))
        pairs = tsv_pairs(corpus_split, segments)
        (folder / "txt" / f"{split}.yaml").write_text("".join(
            f"- {{duration: 0.8, offset: {0.1 + i:.1f}, speaker_id: s, wav: {split}.wav}}\n"
            for i in range(segments)), encoding="utf-8")
        for side, index in (("en", 0), ("de", 1)):
            (folder / "txt" / f"{split}.{side}").write_text(
                "".join(pair[index] + "\n" for pair in pairs), encoding="utf-8")
    return root


def prep(data_root: Path, out: Path) -> None:
    run_script(PREP_MUSTC, ["--data-root", data_root, "--lang", "de", "--splits", "train,dev",
                            "--out", out, "--vocab-size-asr", 60, "--vocab-size-st", 60])


@pytest.fixture(scope="module")
def speech_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("s2t")
    prep(mustc_tree(root / "mustc"), root / "prep")
    return root / "prep"


@pytest.fixture(scope="module")
def speech_checkpoint(speech_data) -> Path:
    folder = speech_data / "runs" / "st_leap"
    folder.mkdir(parents=True)
    return save_random_checkpoint(folder / "checkpoint_last.pt", [
        speech_data, "--task", "speech_to_text", "--config-yaml", "config_st.yaml", "--arch",
        "leapformer_s2t_waitk_tiny", "--waitk-lagging", "2", "--frames-per-unit", "2"])


def broken_mustc(tmp_path: Path) -> Path:
    return mustc_tree(tmp_path / "mustc") / "en-de" / "data" / "train"


def test_prep_refuses_empty_transcript_or_translation_lines(tmp_path):
    train = broken_mustc(tmp_path)
    for side, what in (("de", "translation line"), ("en", "transcript line")):
        path = train / "txt" / f"train.{side}"
        lines = path.read_text(encoding="utf-8").splitlines()
        path.write_text("\n".join([lines[0], "", lines[2]]) + "\n", encoding="utf-8")
        assert refusal(prep, tmp_path / "mustc", tmp_path / "out") == \
            f"[prep] {path}:2: empty {what}"
    assert not (tmp_path / "out" / "train_st.tsv").exists()


def test_prep_refuses_non_utf8_text(tmp_path):
    path = broken_mustc(tmp_path) / "txt" / "train.de"
    path.write_bytes(path.read_bytes().replace("e".encode(), "\xe9".encode("latin-1"), 1))
    assert refusal(prep, tmp_path / "mustc", tmp_path / "out").startswith(
        f"[prep] {path}:1: not UTF-8")


def test_prep_refuses_a_sub_frame_wav(tmp_path):
    wav = write_wav(broken_mustc(tmp_path) / "wav" / "train.wav", noise(0.01, 0))
    assert refusal(prep, tmp_path / "mustc", tmp_path / "out") == \
        f"[prep] {wav}: 160 samples, shorter than one fbank frame ({FRAME_LENGTH} samples, 25 ms)"


def test_prep_refuses_nan_or_inf_audio(tmp_path):
    samples = noise(3.0, 0)
    samples[[10, 20]] = [np.nan, np.inf]
    wav = write_wav(broken_mustc(tmp_path) / "wav" / "train.wav", samples, "FLOAT")
    assert refusal(prep, tmp_path / "mustc", tmp_path / "out") == \
        f"[prep] {wav}: 2 of 48000 samples are NaN or inf"
    assert not list((tmp_path / "out").glob("**/*.partial*"))


def test_prep_refuses_missing_files_mismatched_counts_and_incomplete_segments(tmp_path):
    train = broken_mustc(tmp_path)
    txt, yaml_path = train / "txt", train / "txt" / "train.yaml"
    translations = (txt / "train.de").read_bytes()
    (txt / "train.de").unlink()
    assert refusal(prep, tmp_path / "mustc", tmp_path / "out") == \
        f"[prep] train: missing {txt / 'train.de'} (--data-root, --lang, --splits)"
    (txt / "train.de").write_bytes(translations)

    transcripts = (txt / "train.en").read_text(encoding="utf-8")
    (txt / "train.en").write_text(transcripts + "One more line.\n", encoding="utf-8")
    assert refusal(prep, tmp_path / "mustc", tmp_path / "out") == (
        f"[prep] train: {yaml_path} has 3 segments, {txt / 'train.en'} 4 lines, "
        f"{txt / 'train.de'} 3 lines")
    (txt / "train.en").write_text(transcripts, encoding="utf-8")

    segments = yaml_path.read_text(encoding="utf-8")
    lines = segments.splitlines(keepends=True)
    yaml_path.write_text(lines[0] + lines[1].replace(" speaker_id: s,", "") + lines[2],
                         encoding="utf-8")
    assert refusal(prep, tmp_path / "mustc", tmp_path / "out") == \
        f"[prep] train: {yaml_path} segment 2 lacks {{'speaker_id'}}"

    yaml_path.write_text(segments.replace("wav: train.wav", "wav: talk2.wav"), encoding="utf-8")
    assert refusal(prep, tmp_path / "mustc", tmp_path / "out") == \
        f"[prep] missing {train / 'wav' / 'talk2.wav'} (named in the split's yaml)"
    assert not (tmp_path / "out" / "train_st.tsv").exists()


def test_speech_data_config_and_its_files_are_checked(speech_data, speech_checkpoint, tmp_path):
    """A missing config YAML, and a config whose vocabulary, SentencePiece model or gcmvn.npz is
    missing, are refused naming the file (and the key of the config that names it)."""
    config = tmp_path / "config_st.yaml"
    with pytest.raises(RefusedInput) as refused:
        load_streaming_model(str(speech_checkpoint), str(tmp_path))
    assert str(refused.value) == f"data config YAML not found: {config}"
    text = (speech_data / "config_st.yaml").read_text(encoding="utf-8")
    for what, key, name in (
            ("vocabulary", "vocab_filename", "spm_st.txt"),
            ("SentencePiece model", "bpe_tokenizer.sentencepiece_model", "spm_st.model"),
            ("global CMVN statistics", "global_cmvn.stats_npz_path", "gcmvn.npz")):
        text = text.replace(str((speech_data / name).resolve()), str(tmp_path / name))
        config.write_text(text, encoding="utf-8")
        with pytest.raises(RefusedInput) as refused:
            load_streaming_model(str(speech_checkpoint), str(tmp_path))
        assert str(refused.value) == f"{what} ({key} of {config}) not found: {tmp_path / name}"
        (tmp_path / name).symlink_to(speech_data / name)
    model, _ = load_streaming_model(str(speech_checkpoint), str(tmp_path))  # now complete
    assert hasattr(model, "start_stream")


def test_stream_refuses_nan_or_inf_samples(speech_data, speech_checkpoint):
    model, _ = load_streaming_model(str(speech_checkpoint))
    stream = model.start_stream()
    samples = torch.zeros(1600)
    samples[5] = float("nan")
    with pytest.raises(RefusedInput, match=r"^push_audio: 1 of 1600 samples are NaN or inf$"):
        stream.push_audio(samples)
    assert stream.samples_pushed == 0  # refused before anything was read


def speech_eval(root: Path, speech_data: Path, wavs: Sequence[Path]) -> Path:
    """``root`` as the s2t recipe's data directory for ``wavs``, with the data config,
    vocabulary, SentencePiece model and CMVN of ``speech_data`` linked in (which stays as the
    module's other tests expect it)."""
    for name in ("gcmvn.npz", "spm_st.model", "spm_st.txt", "config_st.yaml"):
        (root / name).symlink_to(speech_data / name)
    (root / "eval.wav_list").write_text("".join(f"{wav}\n" for wav in wavs))
    (root / "eval.de").write_text("".join("ein Satz\n" for _ in wavs), encoding="utf-8")
    (root / "recipe.json").write_text(json.dumps({"lang": "de"}))
    return root


def speech_agent_run(data: Path, checkpoint: Path, output: Path, *flags):
    return simuleval_cli(
        "--agent", SPEECH_AGENT, "--source", data / "eval.wav_list", "--target", data / "eval.de",
        "--source-type", "speech", "--target-type", "text", "--checkpoint", checkpoint,
        "--data-dir", data, "--output", output, "--source-segment-size", 200, "--no-scoring",
        "--no-progress-bar", *flags, cwd=output.parent)


def test_stereo_is_refused_by_name_and_downmixed_on_request(speech_data, speech_checkpoint,
                                                            tmp_path):
    """Through the simuleval CLI: a stereo wav (channels m + d and m - d) is refused naming its
    --source line and channel count; with --downmix its output equals the mono wav's (m). A
    wav shorter than one fbank frame translates to nothing, with a warning naming it."""
    mono = noise(1.5, 7)
    difference = noise(1.5, 8) / 4
    wavs = [write_wav(tmp_path / "mono.wav", mono),
            write_wav(tmp_path / "stereo.wav", np.stack([mono + difference, mono - difference],
                                                        axis=1)),
            write_wav(tmp_path / "short.wav", noise(0.01, 9))]
    data = speech_eval(tmp_path, speech_data, wavs)
    listing = data / "eval.wav_list"

    done = speech_agent_run(data, speech_checkpoint, tmp_path / "refused")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"{listing}:2 ({wavs[1]}): audio: 2 channels; expected mono audio (pass --downmix to "
        "average the channels, or convert the wav to mono)")
    assert "Traceback" not in done.stderr

    done = speech_agent_run(data, speech_checkpoint, tmp_path / "downmix", "--downmix")
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in
               (tmp_path / "downmix" / "instances.log").read_text().splitlines()]
    assert records[1]["prediction"] == records[0]["prediction"]
    assert records[1]["delays"] == records[0]["delays"]
    assert records[2]["prediction"] == ""
    assert f"{listing}:3 ({wavs[2]}): 160 samples, shorter than one fbank frame (400); " \
           "translated to nothing" in done.stderr


def test_s2t_evaluate_reports_a_run_that_wrote_nothing(speech_data, speech_checkpoint, tmp_path):
    data = speech_eval(tmp_path, speech_data, [write_wav(tmp_path / f"{i}.wav", noise(1.0, i))
                                               for i in range(2)])
    output = tmp_path / "eval"
    message = refusal(s2t.simuleval, data, speech_checkpoint, output, 1000, 200, 0,
                      False, ["--max-len-a", "0", "--max-len-b", "1"])
    assert message == (f"[s2t] simuleval wait-1000 st_leap: {output / 'instances.log'}: the "
                       "agent wrote nothing for any of its 2 instances, so there is no latency "
                       "to score")


# -------------------------------------------------------------------------------- recipes
def test_recipes_refuse_to_train_before_prepare_or_st_without_asr(tmp_path):
    data = tmp_path / "data"
    assert cli_refusal(T2T_RECIPE, ["train", "--data", data]) == \
        f"[t2t] train: {data / 'data-bin'} not found; run prepare first"
    assert refusal(run_script, S2T_RECIPE, ["train-asr", "--data", data]) == \
        f"[s2t] train-asr: {data / 'config_asr.yaml'} not found; run prepare first"
    # prepare stopped before its last file: the configs are there, recipe.json is not
    data.mkdir()
    for task in ("asr", "st"):
        (data / f"config_{task}.yaml").write_text("vocab_filename: spm.txt\n")
    for command, task in (("train-asr", "asr"), ("train-st", "st")):
        assert refusal(run_script, S2T_RECIPE, [command, "--data", data]) == \
            f"[s2t] train-{task}: missing {data / 'recipe.json'}; run prepare first"
    (data / "recipe.json").write_text(json.dumps({"train": "train", "valid": "dev"}))
    asr = data / "runs" / "asr_cosformer-cosformer-softmax_k3" / "checkpoint_last.pt"
    assert refusal(run_script, S2T_RECIPE, ["train-st", "--data", data, "--attn-type",
                                            "cosformer-cosformer-softmax", "--waitk", "3"]) == \
        f"[s2t] train-st: ASR checkpoint {asr} not found; run train-asr --attn-type " \
        "cosformer-cosformer-softmax --waitk 3 or pass --asr-checkpoint"
    assert refusal(run_script, S2T_RECIPE, ["train-st", "--data", data, "--asr-checkpoint",
                                            tmp_path / "asr.pt"]).startswith(
        f"[s2t] train-st: ASR checkpoint {tmp_path / 'asr.pt'} not found; ")


def test_recipes_refuse_to_evaluate_without_the_checkpoint_or_prepared_files(tmp_path):
    """Each missing file named in turn: the run's checkpoint, then what prepare writes."""
    data = tmp_path / "t2t"
    evaluate = ["evaluate", "--data", data, "--attn-types", "leap", "--waitk", "3"]
    checkpoint = data / "runs" / "leap_k3" / "checkpoint_last.pt"
    assert cli_refusal(T2T_RECIPE, evaluate) == \
        f"[t2t] evaluate: missing {checkpoint}; run train --attn-type leap --waitk 3 first"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    prepared = [data / "recipe.json", data / "test.en", data / "test.de", data / "data-bin",
                data / "spm.model"]
    for number, path in enumerate(prepared):
        assert cli_refusal(T2T_RECIPE, evaluate) == \
            f"[t2t] evaluate: missing {path}; run prepare first"
        if number == 0:
            path.write_text(json.dumps({"src": "en", "tgt": "de"}))
        elif path.name == "data-bin":
            path.mkdir()
        else:
            path.write_text("")
    assert not (data / "eval").exists()

    data = tmp_path / "s2t"
    evaluate = ["evaluate", "--data", data, "--attn-types", "leap", "--waitk", "5"]
    checkpoint = data / "runs" / "st_leap_k5" / "checkpoint_last.pt"
    assert refusal(run_script, S2T_RECIPE, evaluate) == \
        f"[s2t] evaluate: missing {checkpoint}; run train-st --attn-type leap --waitk 5 first"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    for number, path in enumerate([data / "recipe.json", data / "eval.wav_list",
                                   data / "eval.de"]):
        assert refusal(run_script, S2T_RECIPE, evaluate) == \
            f"[s2t] evaluate: missing {path}; run prepare first"
        path.write_text(json.dumps({"lang": "de"}) if number == 0 else "")
    assert refusal(run_script, S2T_RECIPE, [*evaluate, "--test-set", "heldout"]) == \
        f"[s2t] evaluate: missing {data / 'heldout.wav_list'}; run prepare first with " \
        "--heldout-split"


def test_a_failing_recipe_step_is_named_with_its_exit_code(tmp_path, capfd):
    """The cheapest real failing step: s2t prepare on a --data-root without en-de. Its command
    (prep_mustc.py, a real process) refuses with its own line and exit code 1, no traceback;
    then the recipe stops naming the step."""
    assert refusal(run_script, S2T_RECIPE, ["prepare", "--data-root", tmp_path / "nowhere",
                                            "--out", tmp_path / "out"]) == \
        "[s2t] prepare: prep_mustc failed (exit code 1)"
    err = capfd.readouterr().err
    assert err.strip().splitlines()[-1] == \
        f"[prep] {tmp_path / 'nowhere' / 'en-de'} not found (--data-root, --lang)"
    assert "Traceback" not in err


def test_a_failing_logged_step_names_its_log(tmp_path):
    """fairseq-train failing on an empty data-bin (it exits 1): the recipe names the step, the
    exit code and the log that holds fairseq's own message."""
    (tmp_path / "data-bin").mkdir()
    log = tmp_path / "runs" / "leap_k3" / "train.log"
    assert cli_refusal(T2T_RECIPE, ["train", "--data", tmp_path, "--cpu"]) == \
        f"[t2t] train leap wait-3 failed (exit code 1); its output is in {log}"
    assert "Could not infer language pair" in log.read_text()


# -------------------------------------------------------------------------------- outputs
def test_outputs_are_written_atomically(tmp_path):
    """A failing write leaves the previous file as it was and no partial file beside it."""
    target = tmp_path / "results.md"
    common.write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with common.atomic_output(target) as partial:
            partial.write_text("half")
            raise RuntimeError("the step failed")
    assert target.read_text() == "old\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results.md"]
    common.write_text(target, "new\n")
    assert target.read_text() == "new\n"
