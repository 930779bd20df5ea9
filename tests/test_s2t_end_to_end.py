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
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
import soundfile
import torch
from simuleval.data.segments import SpeechSegment

from leapformer_fairseq.audio import GlobalCMVN, num_frames, to_int16_scale
from leapformer_fairseq.models.streaming import load_streaming_model, speech_waitk_greedy_decode
from leapformer_fairseq.simuleval_scores import read_scores_tsv

ROOT = Path(__file__).resolve().parents[1]
TEST_UTTERANCES = 10


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("s2t")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "s2t_recipe.py"), "demo", "--out", str(out),
         "--train-pairs", "60", "--test-pairs", str(TEST_UTTERANCES), "--vocab-size", "200",
         "--asr-updates", "12", "--st-updates", "12", "--waitk", "2",
         "--pre-decision-ratio", "3", "--segment-ms", "160"],
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
    ratio, waitk = cross.waitk_stride, cross.waitk_lagging
    for instance, wav in zip(instances, wavs):
        samples, rate = soundfile.read(wav, dtype="float32")
        assert rate == 16000
        tokens = speech_waitk_greedy_decode(model, to_int16_scale(samples), cmvn)
        expected = spm.decode_pieces([task.target_dictionary[t] for t in tokens
                                      if t != task.target_dictionary.eos()])
        assert instance["prediction"].split() == expected.split(), wav
        frames = model.encoder.subsampler.output_lengths(torch.tensor(num_frames(len(samples))))
        units = -(-int(frames) // ratio)
        assert len(tokens) - 1 >= units - waitk, wav


def load_speech_agent_class():
    path = ROOT / "simuleval_agents" / "leap_waitk_speech_agent.py"
    spec = importlib.util.spec_from_file_location("leap_waitk_speech_agent", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LeaPWaitkSpeechAgent


def test_agent_finishes_with_the_source_and_does_not_leak(demo):
    """SimulEval's own agent API (pushpop of 100 ms SpeechSegments), three utterances in a row,
    reset only when the agent writes finished=True, as SimulEval's evaluator does: finished=True
    comes exactly with the last segment, and every utterance's words equal offline decoding of
    that utterance alone, so nothing leaks from one utterance into the next."""
    agent_class = load_speech_agent_class()
    threads = torch.get_num_threads()  # the agent sets it; restored below
    checkpoint = demo / "runs" / "st_leap_k2" / "checkpoint_last.pt"
    agent = agent_class(argparse.Namespace(
        checkpoint=str(checkpoint), data_dir=str(demo), config_yaml="config_st.yaml",
        waitk=None, max_len_a=3.0, max_len_b=10, recompute=False, device="cpu", threads=threads,
        eos_before_end=False))
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
    with pytest.raises(ValueError, match="8000 Hz"):
        agent.pushpop(SpeechSegment(index=0, content=[0.0] * 800, sample_rate=8000,
                                    finished=False))
    torch.set_num_threads(threads)
