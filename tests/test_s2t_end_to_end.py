"""Speech end to end on a tiny synthesised corpus, through the recipe's demo: espeak-ng TTS ->
prep_mustc -> tiny ASR -> tiny wait-k ST (encoder from the ASR) -> the ``simuleval`` CLI with
the speech agent -> BLEU and latency plain and computation-aware. Then the agent's outputs are
checked against offline wait-k greedy decoding of the same checkpoint, as whole words,
whitespace-normalised. Nothing here depends on what the undertrained models emit. The recipe runs
on one torch thread, so the checkpoints are the same whatever the machine's core count."""
import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import soundfile
import torch
import yaml
from simuleval.data.segments import SpeechSegment

from leapformer_fairseq.audio import GlobalCMVN, num_frames, to_int16_scale
from leapformer_fairseq.models.streaming import load_streaming_model, speech_waitk_greedy_decode
from leapformer_fairseq.recipes.s2t import side_by_side
from leapformer_fairseq.simuleval_scores import read_scores_tsv

ROOT = Path(__file__).resolve().parents[1]
TEST_UTTERANCES = 10
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("s2t")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "s2t_recipe.py"), "demo", "--out", str(out),
         "--train-pairs", "60", "--test-pairs", str(TEST_UTTERANCES), "--vocab-size", "200",
         "--asr-updates", "12", "--st-updates", "12", "--waitk", "2",
         "--frames-per-unit", "3", "--segment-ms", "160"],
        check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return out


def test_scores_hold_plain_and_computation_aware_latency(demo):
    run = demo / "eval" / "leap_k2"
    scores = read_scores_tsv(run / "scores_plain_ca.tsv")
    for name in ("BLEU", "AL", "AL_CA", "LAAL", "LAAL_CA", "AP", "AP_CA", "DAL", "DAL_CA",
                 "ATD", "ATD_CA"):
        assert name in scores
    # computation-aware latency adds the agent's compute time to every delay
    assert scores["AL_CA"] > scores["AL"] > 0
    # SimulEval's own scores.tsv (made with --computation-aware) has both columns equal: the
    # defect the re-scoring works around
    simuleval_scores = read_scores_tsv(run / "scores.tsv")
    assert simuleval_scores["AL"] == pytest.approx(simuleval_scores["AL_CA"])
    assert scores["AL_CA"] == pytest.approx(simuleval_scores["AL_CA"], abs=1e-3)
    instances = [json.loads(line) for line in (run / "instances.log").open()]
    assert len(instances) == TEST_UTTERANCES


def test_heldout_voices_are_scored_against_the_same_references(demo):
    """prepare cut tst-HE (the test pairs in voices no training talk uses) beside tst-COMMON;
    the demo evaluated the model on both."""
    assert (demo / "heldout.de").read_text() == (demo / "eval.de").read_text()
    heldout, heard = ((demo / f"{name}.wav_list").read_text().splitlines()
                      for name in ("heldout", "eval"))
    assert len(heldout) == len(heard) == TEST_UTTERANCES and not set(heldout) & set(heard)
    run = demo / "heldout" / "leap_k2"
    scores = read_scores_tsv(run / "scores_plain_ca.tsv")
    assert scores["AL_CA"] > scores["AL"] > 0
    instances = [json.loads(line) for line in (run / "instances.log").open()]
    assert [instance["source"][0] for instance in instances] == heldout
    # the transcripts beside them: what the voices say, the test pairs' English side
    pairs = (ROOT / "data" / "gettext-mt" / "en-de.test.tsv").read_text().splitlines()[1:]
    transcripts = [line.split("\t")[1] for line in pairs[:TEST_UTTERANCES]]
    for name in ("heldout", "eval"):
        assert (demo / f"{name}.en").read_text().splitlines() == transcripts


def test_prepare_tests_only_cuts_the_test_sets_again_and_nothing_else(demo, tmp_path):
    """``prepare --tests-only`` into an earlier output: the test sets' wavs, references and
    transcripts cut again from the data root (here their first 4 segments), every other file
    left as it was and none added; another --lang than the output's is refused."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("recipe.json", "spm_st.model"):
        shutil.copyfile(demo / name, data / name)
    command = [sys.executable, ROOT / "scripts" / "s2t_recipe.py", "prepare", "--tests-only",
               "--data-root", demo / "tts", "--out", data, "--heldout-split", "tst-HE",
               "--max-eval", "4"]
    done = run(command)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert sorted(path.name for path in data.iterdir()) == sorted(
        ["recipe.json", "spm_st.model"]
        + [f"{test_set}{suffix}" for test_set in ("eval", "heldout")
           for suffix in ("_wavs", ".wav_list", ".de", ".en")])
    for name in ("recipe.json", "spm_st.model"):
        assert (data / name).read_bytes() == (demo / name).read_bytes()
    for test_set in ("eval", "heldout"):
        for suffix in (".de", ".en"):
            assert (data / f"{test_set}{suffix}").read_text().splitlines() == \
                (demo / f"{test_set}{suffix}").read_text().splitlines()[:4]
        wavs = [(data / f"{test_set}.wav_list").read_text().splitlines(),
                (demo / f"{test_set}.wav_list").read_text().splitlines()[:4]]
        assert [Path(path).read_bytes() for path in wavs[0]] == \
            [Path(path).read_bytes() for path in wavs[1]]
    done = run([*command, "--lang", "es"])
    assert done.returncode != 0
    assert f"prepare --tests-only: --lang es, but {data} was prepared for de" in done.stderr


def test_asr_encoder_initialised_the_st_model(demo):
    asr = torch.load(demo / "runs" / "asr_leap_k2" / "checkpoint_last.pt", weights_only=False)
    st_args = torch.load(demo / "runs" / "st_leap_k2" / "checkpoint_last.pt",
                         weights_only=False)["cfg"]["model"]
    assert st_args.encoder_initialized_from.endswith("asr_leap_k2/checkpoint_last.pt")
    assert st_args.load_pretrained_encoder_from is None  # loading never reads the ASR file
    assert any(name.startswith("encoder.layers.") for name in asr["model"])


def test_agent_output_equals_offline_waitk_greedy(demo):
    """The agent streamed each test utterance in 160 ms segments; offline decoding reads the
    whole wav at once. Same words, for all test utterances. EOS is barred until the wait-k
    window covers the utterance, so every translation has at least ``units - k`` pieces."""
    run = demo / "eval" / "leap_k2"
    model, task = load_streaming_model(str(demo / "runs" / "st_leap_k2" / "checkpoint_last.pt"),
                                       str(demo), overrides={"config_yaml": "config_st.yaml"})
    cmvn = GlobalCMVN.load(task.data_cfg.global_cmvn_stats_npz)
    spm = sentencepiece.SentencePieceProcessor(
        model_file=task.data_cfg.bpe_tokenizer["sentencepiece_model"])
    instances = [json.loads(line) for line in (run / "instances.log").open()]
    wavs = (demo / "eval.wav_list").read_text().splitlines()
    assert len(instances) == len(wavs) == TEST_UTTERANCES
    cross = model.decoder.cross_attention_config
    frames_per_unit, waitk = cross.frames_per_unit, cross.waitk_lagging
    for instance, wav in zip(instances, wavs):
        samples, rate = soundfile.read(wav, dtype="float32")
        assert rate == 16000
        tokens = speech_waitk_greedy_decode(model, to_int16_scale(samples), cmvn)
        expected = spm.decode_pieces([task.target_dictionary[t] for t in tokens
                                      if t != task.target_dictionary.eos()])
        assert instance["prediction"].split() == expected.split(), wav
        frames = model.encoder.subsampler.output_lengths(torch.tensor(num_frames(len(samples))))
        units = -(-int(frames) // frames_per_unit)
        assert len(tokens) - 1 >= units - waitk, wav


def live_view(demo, tmp_path, *options) -> list:
    """``python -m leapformer_fairseq.translate`` on the demo's ST model; its JSON words."""
    output = tmp_path / "words.json"
    subprocess.run([sys.executable, "-m", "leapformer_fairseq.translate", "--checkpoint",
                    str(demo / "runs" / "st_leap_k2" / "checkpoint_last.pt"), "--data-dir",
                    str(demo), "--output", str(output), *map(str, options)],
                   check=True, cwd=ROOT, env=ENV, capture_output=True)
    return json.loads(output.read_text(encoding="utf-8"))


def test_live_view_writes_the_offline_words_of_each_utterance_of_a_talk(demo, tmp_path):
    """A held-out-voice talk with its MuST-C yaml, as fast as possible: each utterance's words
    are offline wait-k decoding's of that utterance, read from no more source than it has, and
    written no earlier than the source they needed."""
    talk = demo / "tts" / "en-de" / "data" / "tst-HE"
    wav = sorted((talk / "wav").iterdir())[0]
    words = live_view(demo, tmp_path, "--wav", wav, "--segments", talk / "txt" / "tst-HE.yaml",
                      "--segment-ms", 160, "--no-realtime")
    model, task = load_streaming_model(str(demo / "runs" / "st_leap_k2" / "checkpoint_last.pt"),
                                       str(demo), overrides={"config_yaml": "config_st.yaml"})
    cmvn = GlobalCMVN.load(task.data_cfg.global_cmvn_stats_npz)
    spm = sentencepiece.SentencePieceProcessor(
        model_file=task.data_cfg.bpe_tokenizer["sentencepiece_model"])
    samples, _ = soundfile.read(wav, dtype="float32")
    segments = [entry for entry in yaml.safe_load((talk / "txt" / "tst-HE.yaml").read_text())
                if entry["wav"] == wav.name]
    assert {record["utterance"] for record in words} == set(range(len(segments)))
    for number, entry in enumerate(segments):
        start, end = entry["offset"], entry["offset"] + entry["duration"]
        cut = samples[round(start * 16000):round(end * 16000)]
        tokens = speech_waitk_greedy_decode(model, to_int16_scale(cut), cmvn)
        expected = spm.decode_pieces([task.target_dictionary[t] for t in tokens
                                      if t != task.target_dictionary.eos()]).split()
        mine = [record for record in words if record["utterance"] == number]
        assert [record["word"] for record in mine] == expected
        sources = [record["source_s"] for record in mine]
        assert sources == sorted(sources)
        assert all(start < source <= end + 1e-3 for source in sources)
        assert all(record["written_s"] >= record["source_s"] for record in mine)


def test_live_view_in_real_time_takes_the_audio_time(demo, tmp_path):
    """Played in real time, a held-out-voice talk (about 25 s) takes at least its duration, and
    no word is written (on the wall clock) before its source has been played. Lower bounds only:
    a busy machine (the suite runs in parallel workers) cannot fail them."""
    wav = sorted((demo / "tts" / "en-de" / "data" / "tst-HE" / "wav").iterdir())[0]
    seconds = soundfile.info(wav).duration
    started = time.perf_counter()
    words = live_view(demo, tmp_path, "--wav", wav, "--segment-ms=200")
    assert time.perf_counter() - started >= seconds
    assert all(record["written_s"] >= record["source_s"] - 0.05 for record in words)


def test_live_view_refuses_what_it_cannot_play(demo, tmp_path):
    def refusal(*options) -> str:
        done = subprocess.run([sys.executable, "-m", "leapformer_fairseq.translate",
                               "--checkpoint", str(demo / "runs" / "st_leap_k2" /
                                                   "checkpoint_last.pt"),
                               "--data-dir", str(demo), *map(str, options)],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, input="a b\n")
        assert done.returncode == 1
        return done.stderr.strip().splitlines()[-1]

    assert refusal() == "[translate] text input needs --spm (or pass --wav for speech)"
    assert refusal("--wav", tmp_path / "no.wav") == \
        f"[translate] --wav {tmp_path / 'no.wav'}: no such file"
    soundfile.write(tmp_path / "cd.wav", np.zeros(4410, dtype=np.float32), 44100)
    assert refusal("--wav", tmp_path / "cd.wav") == \
        f"[translate] --wav {tmp_path / 'cd.wav'}: 44100 Hz; the model reads 16000 Hz"
    soundfile.write(tmp_path / "a.wav", np.zeros(1600, dtype=np.float32), 16000)
    (tmp_path / "talk.yaml").write_text("- {duration: 0.1, offset: 0.0, wav: other.wav}\n")
    assert refusal("--wav", tmp_path / "a.wav", "--segments", tmp_path / "talk.yaml") == \
        f"[translate] --segments {tmp_path / 'talk.yaml'}: no segment of a.wav"
    assert refusal("--wav", tmp_path / "a.wav", "--segment-ms", 0) == \
        "[translate] --segment-ms and --words-per-second must be positive"


def load_speech_agent_class():
    path = ROOT / "simuleval_agents" / "leap_waitk_speech_agent.py"
    spec = importlib.util.spec_from_file_location("leap_waitk_speech_agent", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LeaPWaitkSpeechAgent


def test_agent_finishes_with_the_source_and_does_not_leak(demo, one_torch_thread):
    """SimulEval's own agent API (pushpop of 100 ms SpeechSegments), three utterances in a row,
    reset only when the agent writes finished=True, as SimulEval's evaluator does: finished=True
    comes exactly with the last segment, and every utterance's words equal offline decoding of
    that utterance alone, so nothing leaks from one utterance into the next."""
    agent_class = load_speech_agent_class()
    checkpoint = demo / "runs" / "st_leap_k2" / "checkpoint_last.pt"
    agent = agent_class(argparse.Namespace(
        checkpoint=str(checkpoint), data_dir=str(demo), config_yaml="config_st.yaml",
        waitk=None, max_len_a=3.0, max_len_b=10, recompute=False, device="cpu", threads=1,
        eos_before_end=False, downmix=False))
    model, task = load_streaming_model(str(checkpoint), str(demo),
                                       overrides={"config_yaml": "config_st.yaml"})
    cmvn = GlobalCMVN.load(task.data_cfg.global_cmvn_stats_npz)
    spm = sentencepiece.SentencePieceProcessor(
        model_file=task.data_cfg.bpe_tokenizer["sentencepiece_model"])
    for wav in (demo / "eval.wav_list").read_text().splitlines()[:3]:
        samples, _ = soundfile.read(wav, dtype="float32")
        written = []
        for start in range(0, len(samples), 1600):
            last = start + 1600 >= len(samples)
            output = agent.pushpop(SpeechSegment(
                index=start, content=samples[start:start + 1600].tolist(), sample_rate=16000,
                finished=last))
            assert output.finished == last
            if output.content:
                written.append(output.content)
            if output.finished:
                agent.reset()
        tokens = speech_waitk_greedy_decode(model, to_int16_scale(samples), cmvn)
        expected = spm.decode_pieces([task.target_dictionary[t] for t in tokens
                                      if t != task.target_dictionary.eos()])
        assert " ".join(written).split() == expected.split(), wav
    with pytest.raises(ValueError, match="utterance 3: push_audio: 1 of 800 samples are NaN or "
                                         "inf"):
        agent.pushpop(SpeechSegment(index=0, content=[0.0] * 799 + [float("nan")],
                                    sample_rate=16000, finished=False))
    with pytest.raises(ValueError, match="utterance 3: audio at 8000 Hz; this agent reads "
                                         "16000 Hz"):
        agent.pushpop(SpeechSegment(index=0, content=[0.0] * 800, sample_rate=8000,
                                    finished=False))


def run(command, timeout=300):
    return subprocess.run([str(c) for c in command], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=ENV)


def fairseq_generate(data: Path, checkpoint: Path, subset: str = "tst-COMMON_st"):
    """``fairseq-generate`` on a speech subset; returns the hypothesis lines ``{id: text}``.
    ``--required-batch-size-multiple 1``: with fairseq's default of 8 the last batch of a subset
    whose size is not a multiple of 8 is silently dropped (fairseq issue #5036)."""
    done = run([sys.executable, "-m", "fairseq_cli.generate", data,
                "--user-dir", ROOT / "leapformer_fairseq", "--task", "speech_to_text",
                "--config-yaml", "config_st.yaml", "--gen-subset", subset, "--path", checkpoint,
                "--max-tokens", "50000", "--beam", "4", "--max-len-b", "20",
                "--required-batch-size-multiple", "1", "--cpu"])
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return dict(re.findall(r"^H-(\d+)\t\S+\t(.*)$", done.stdout, flags=re.M))


def subset_size(data: Path, subset: str = "tst-COMMON_st") -> int:
    return len((data / f"{subset}.tsv").read_text(encoding="utf-8").splitlines()) - 1


def speech_train_command(data: Path, arch: str, save: Path, *extra):
    """``fairseq-train`` with the speech recipe's data options (configs/s2t/), 2 updates."""
    return [sys.executable, "-m", "fairseq_cli.train", data, "--user-dir",
            ROOT / "leapformer_fairseq", "--task", "speech_to_text", "--config-yaml",
            "config_st.yaml", "--train-subset", "train_st", "--valid-subset", "dev_st",
            "--arch", arch, "--criterion", "label_smoothed_cross_entropy",
            "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "2e-3",
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "100", "--max-tokens", "20000",
            "--max-update", "2", "--save-dir", save, "--no-epoch-checkpoints", "--seed", "1",
            "--log-format", "simple", "--num-workers", "0", "--required-batch-size-multiple", "1",
            "--disable-validation", "--cpu", *extra]


def test_st_checkpoint_runs_without_its_asr_run(demo, tmp_path):
    """Checkpoints are self-contained: with the ASR run directory gone (moved out of the data
    directory for this test, put back afterwards for the module's other tests), the ST checkpoint
    loads in the ``simuleval`` CLI with the recipe's options, whose output equals the recipe's
    run (instances.log: words and delays; ``elapsed`` is wall-clock time), and in
    ``fairseq-generate``, which translates every utterance. A checkpoint saved before
    build_encoder cleared ``--load-pretrained-encoder-from`` (the option still naming the missing
    file) loads too: for streaming, to the same parameters, and in ``fairseq-generate``."""
    checkpoint = demo / "runs" / "st_leap_k2" / "checkpoint_last.pt"
    saved = torch.load(checkpoint, weights_only=False)
    asr_checkpoint = Path(saved["cfg"]["model"].encoder_initialized_from)
    asr_run = demo / "runs" / "asr_leap_k2"
    assert asr_checkpoint.parent.resolve() == asr_run.resolve()
    old_style = tmp_path / "old_style.pt"
    saved["cfg"]["model"].load_pretrained_encoder_from = str(asr_checkpoint)
    torch.save(saved, old_style)
    recipe_run, output = demo / "eval" / "leap_k2", tmp_path / "eval"
    shutil.move(asr_run, tmp_path / "asr_leap_k2")
    try:
        assert not asr_checkpoint.exists()
        done = run([sys.executable, "-m", "simuleval.cli",
                    "--agent", ROOT / "simuleval_agents" / "leap_waitk_speech_agent.py",
                    "--source", demo / "eval.wav_list", "--target", demo / "eval.de",
                    "--source-type", "speech", "--target-type", "text",
                    "--checkpoint", checkpoint, "--data-dir", demo,
                    "--config-yaml", "config_st.yaml", "--waitk", "2", "--output", output,
                    "--source-segment-size", "160", "--quality-metrics", "BLEU",
                    "--latency-metrics", "AL", "LAAL", "AP", "DAL", "ATD",
                    "--eval-latency-unit", "word", "--computation-aware"])
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

        def instances(run_dir):
            return [{k: v for k, v in json.loads(line).items() if k != "elapsed"}
                    for line in (run_dir / "instances.log").open()]
        assert instances(output) == instances(recipe_run)
        assert len(instances(output)) == TEST_UTTERANCES

        hypotheses = fairseq_generate(demo, checkpoint)
        assert sorted(map(int, hypotheses)) == list(range(subset_size(demo)))
        assert fairseq_generate(demo, old_style) == hypotheses

        model, _ = load_streaming_model(str(checkpoint), str(demo),
                                        overrides={"config_yaml": "config_st.yaml"})
        old_model, _ = load_streaming_model(str(old_style), str(demo),
                                            overrides={"config_yaml": "config_st.yaml"})
        expected = model.state_dict()
        for name, tensor in old_model.state_dict().items():
            assert torch.equal(tensor, expected[name]), name
    finally:
        shutil.move(tmp_path / "asr_leap_k2", asr_run)


def test_a_packaged_model_streams_from_its_folder_alone(demo, tmp_path):
    """``package`` makes the ST run a folder that needs nothing else: the checkpoint in fp16
    without optimizer state, and the SentencePiece model, vocabulary and CMVN its configuration
    names within the folder (the folder is streamed from elsewhere, the prepared data's copies
    renamed away meanwhile). ``show`` streams it over the held-out voices and prints each
    transcript beside the translation it streamed, then BLEU, AL and AL_CA as re-scored."""
    checkpoint = demo / "runs" / "st_leap_k2" / "checkpoint_last.pt"
    model = tmp_path / "model"
    done = run([sys.executable, ROOT / "scripts" / "s2t_recipe.py", "package", "--data", demo,
                "--checkpoint", checkpoint, "--out", model])
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert sorted(path.name for path in model.iterdir()) == [
        "checkpoint.pt", "config_st.yaml", "gcmvn.npz", "model.json", "spm_st.model",
        "spm_st.txt"]
    assert json.loads((model / "model.json").read_text()) == {
        "waitk": 2, "arch": "leapformer_s2t_waitk_tiny", "encoder_attn_type": "leap",
        "decoder_attn_type": "leap", "cross_attn_type": "leap", "leap_feature_map": "hedgehog",
        "waitk_lagging": 2, "frames_per_unit": 3, "num_updates": 12}
    packaged = torch.load(model / "checkpoint.pt", weights_only=False)
    trained = torch.load(checkpoint, weights_only=False)
    assert "last_optimizer_state" not in packaged
    for name, tensor in trained["model"].items():
        assert torch.equal(packaged["model"][name], tensor.half()), name

    moved = {name: demo / f"moved-{name}" for name in ("spm_st.model", "spm_st.txt", "gcmvn.npz")}
    for name, path in moved.items():
        (demo / name).rename(path)
    try:
        output = tmp_path / "show"
        done = run([sys.executable, ROOT / "scripts" / "s2t_recipe.py", "show", "--model", model,
                    "--data", demo, "--sentences", "4", "--segment-ms", "160",
                    "--out", output])
    finally:
        for name, path in moved.items():
            path.rename(demo / name)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    instances = [json.loads(line) for line in (output / "instances.log").open()]
    wavs = (demo / "heldout.wav_list").read_text().splitlines()[:4]
    assert [instance["source"][0] for instance in instances] == wavs
    transcripts = (demo / "heldout.en").read_text().splitlines()[:4]
    table = side_by_side([("transcript", "translation"),
                          *zip(transcripts, (item["prediction"] for item in instances))])
    assert "\n".join(table) in done.stdout
    scores = read_scores_tsv(output / "scores_plain_ca.tsv")
    assert (f"BLEU {scores['BLEU']:.2f}  AL {scores['AL']:.0f} ms  "
            f"AL_CA {scores['AL_CA']:.0f} ms") in done.stdout
    assert "LeaP wait-2 on units of 3 encoder frames, 12 updates" in done.stdout


def test_package_and_show_refuse_what_they_cannot_use(demo, tmp_path):
    """package refuses an ASR run, and a multi-path run without a --waitk of its set (with one,
    it streams at that k); a folder that is not a package is named with the missing file, the
    demo checking ``--model`` before it trains; show names the transcripts a prepared folder
    lacks."""
    recipe = [sys.executable, ROOT / "scripts" / "s2t_recipe.py"]
    multipath = tmp_path / "multipath"
    done = run(speech_train_command(demo, "leapformer_s2t_waitk_tiny", multipath,
                                    "--waitk-lagging", "1-3", "--frames-per-unit", "3"))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    multipath = multipath / "checkpoint_last.pt"
    for checkpoint, waitk, message in (
            (demo / "runs" / "asr_leap_k2" / "checkpoint_last.pt", [],
             "is not a train-st run (trained with --config-yaml config_asr.yaml)"),
            (multipath, [], "was trained at wait-k 1-3; give --waitk K, one of 1,2,3"),
            (multipath, ["--waitk", "4"], "was trained at wait-k 1-3; give --waitk K, one of"),
            (demo / "runs" / "st_leap_k2" / "checkpoint_last.pt", ["--waitk", "3"],
             "was trained at wait-k 2; give --waitk K, one of 2")):
        done = run([*recipe, "package", "--data", demo, "--checkpoint", checkpoint,
                    "--out", tmp_path / "model", *waitk])
        assert done.returncode != 0 and f"--checkpoint {checkpoint} {message}" in done.stderr
        assert not (tmp_path / "model").exists()
    done = run([*recipe, "package", "--data", demo, "--checkpoint", multipath,
                "--out", tmp_path / "model", "--waitk", "2"])
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    record = json.loads((tmp_path / "model" / "model.json").read_text())
    assert (record["waitk"], record["waitk_lagging"]) == (2, "1-3")
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.json").write_text("{}")
    done = run([*recipe, "demo", "--out", tmp_path / "demo", "--model", half])
    assert done.returncode != 0
    assert f"--model {half}: missing {half / 'checkpoint.pt'}" in done.stderr
    assert not (tmp_path / "demo").exists()
    for name in ("checkpoint.pt", "config_st.yaml", "spm_st.model", "spm_st.txt", "gcmvn.npz"):
        (half / name).write_text("")  # every file present: show reads none before the data
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(demo / "recipe.json", data / "recipe.json")
    done = run([*recipe, "show", "--model", half, "--data", data])
    assert done.returncode != 0
    assert f"show: missing {data / 'heldout.en'}; run prepare again" in done.stderr


def test_side_by_side_wraps_each_column_and_keeps_every_word():
    left = "Emit information about resource usage in sorting."
    right = "Gibt Informationen über die Ressourcenverwendung beim Sortieren aus."
    lines = side_by_side([(left, right), ("", "leer")], width=20)
    assert all(line.startswith("  ") for line in lines)
    columns = [line[2:].split(" | ") for line in lines]
    assert all(len(cells) == 2 and len(cells[0]) == 20 for cells in columns)
    assert " ".join(cells[0] for cells in columns[:-1]).split() == left.split()
    assert " ".join(cells[1] for cells in columns[:-1]).split() == right.split()
    assert columns[-1] == [" " * 20, "leer"]


def test_fairseq_generate_on_the_offline_speech_arch(demo, tmp_path):
    """``leapformer_s2t_transformer`` trained with ``fairseq-train`` as the recipe would (2
    updates) runs in ``fairseq-generate``: one hypothesis per utterance of the subset (the
    wait-k arch is covered by the test above)."""
    save = tmp_path / "offline"
    done = run(speech_train_command(demo, "leapformer_s2t_transformer_tiny", save))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    hypotheses = fairseq_generate(demo, save / "checkpoint_last.pt")
    assert sorted(map(int, hypotheses)) == list(range(subset_size(demo)))


def test_training_with_a_missing_pretrained_encoder_fails_clearly(demo, tmp_path):
    missing = tmp_path / "asr" / "checkpoint_last.pt"
    save = tmp_path / "st"
    done = run(speech_train_command(demo, "leapformer_s2t_waitk_tiny", save,
                                    "--waitk-lagging", "2", "--frames-per-unit", "3",
                                    "--load-pretrained-encoder-from", missing))
    assert done.returncode != 0
    assert any("--load-pretrained-encoder-from" in line and str(missing) in line
               for line in done.stderr.splitlines()), done.stderr[-4000:]
    assert not list(save.glob("*.pt"))
