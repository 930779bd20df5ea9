"""Speech models: causal subsampler, streamed encoder == offline encoder, streamed wait-k
decoding == offline wait-k greedy decoding, and the work a stream does."""
import argparse
import random
import subprocess
from types import SimpleNamespace

import pytest
import soundfile
import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY
from fairseq.models.speech_to_text.modules.convolution import Conv1dSubsampler
from test_streaming import state_footprint

import leapformer_fairseq  # noqa: F401  (registers the models)
from leapformer_fairseq.audio import GlobalCMVN, fbank, to_int16_scale, to_mono_16k
from leapformer_fairseq.models import LeaPformerS2TTransformerModel, LeaPformerS2TWaitkModel
from leapformer_fairseq.models.streaming import speech_waitk_greedy_decode
from leapformer_fairseq.modules import ATTN_TYPES, LINEAR_ATTN_TYPES
from leapformer_fairseq.modules.causal_conv_subsampler import CausalConv1dSubsampler

SENTENCES = [
    "Emit information about resource usage in sorting.",
    "added by us",
    "improper format list",
    "Could not open the file for writing.",
    "The operation was cancelled by the user.",
]


@pytest.fixture(scope="module")
def utterances(tmp_path_factory):
    """Real speech: espeak-ng, resampled to 16 kHz, int16 scale ``(N,)`` each."""
    folder = tmp_path_factory.mktemp("tts")
    audio = []
    for index, text in enumerate(SENTENCES):
        path = folder / f"{index}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "170", "-w", str(path), "--", text],
                       check=True)
        samples, rate = soundfile.read(path, dtype="float32")
        audio.append(to_int16_scale(to_mono_16k(torch.from_numpy(samples), rate, True, path)))
    return audio


@pytest.fixture(scope="module")
def cmvn(utterances):
    features = torch.cat([fbank(samples) for samples in utterances]).numpy()
    return GlobalCMVN(features.mean(axis=0), features.std(axis=0))


def build_s2t_model(attn_type, model_class=LeaPformerS2TWaitkModel, waitk=2, frames_per_unit=3,
                    seed=0, vocab=24, unit_causal=False):
    torch.manual_seed(seed)
    dictionary = Dictionary()
    for i in range(vocab):
        dictionary.add_symbol(f"w{i}")
    name = "leapformer_s2t_waitk_tiny" if model_class is LeaPformerS2TWaitkModel \
        else "leapformer_s2t_transformer_tiny"
    args = argparse.Namespace(
        arch=name, waitk_lagging=waitk, frames_per_unit=frames_per_unit,
        encoder_attn_type=attn_type, decoder_attn_type=attn_type, cross_attn_type=attn_type,
        dropout=0.0, input_feat_per_channel=80, input_channels=1, max_source_positions=6000,
        max_target_positions=1024, unit_causal_encoder=unit_causal,
    )
    ARCH_CONFIG_REGISTRY[name](args)
    model = model_class.build_model(args, SimpleNamespace(target_dictionary=dictionary))
    with torch.no_grad():  # a sharper output layer, so greedy outputs vary between utterances
        model.decoder.output_projection.weight.mul_(8.0)
    return model.eval(), dictionary


# ------------------------------------------------------------------------------ subsampler
def test_causal_subsampler_shapes_names_and_causality():
    torch.manual_seed(0)
    sub = CausalConv1dSubsampler(80, 32, 16, (3, 3))
    fairseq_sub = Conv1dSubsampler(80, 32, 16, (3, 3))
    assert ({k: v.shape for k, v in sub.state_dict().items()}
            == {k: v.shape for k, v in fairseq_sub.state_dict().items()})
    x = torch.randn(2, 37, 80)
    out, lengths = sub(x, torch.tensor([37, 20]))
    assert out.shape == (10, 2, 16) and lengths.tolist() == [10, 5]
    # output j reads inputs up to 4j + 3 only: changing later frames leaves it unchanged
    changed = x.clone()
    changed[:, 24:] = torch.randn(2, 13, 80)
    out_changed, _ = sub(changed, torch.tensor([37, 20]))
    torch.testing.assert_close(out_changed[:6], out[:6], rtol=0, atol=0)
    assert not torch.allclose(out_changed[6:], out[6:])
    # right padding never changes a shorter sequence's outputs
    alone, _ = sub(x[1:, :20], torch.tensor([20]))
    torch.testing.assert_close(out[:5, 1:], alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_causal_subsampler_incremental_equals_offline(seed):
    generator = torch.Generator().manual_seed(seed)
    sub = CausalConv1dSubsampler(80, 32, 16, (3, 3))
    x = torch.randn(1, 101, 80, generator=generator)
    offline, _ = sub(x, torch.tensor([101]))
    state, pieces, start = {}, [], 0
    while start < 101:
        step = int(torch.randint(1, 12, (1,), generator=generator))
        pieces.append(sub.forward_incremental(x[:, start:start + step], state))
        start += step
    torch.testing.assert_close(torch.cat(pieces), offline, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- prefix consistency
def push_in_random_chunks(stream, samples, rng):
    """Push audio in random chunks of 10-500 ms."""
    position = 0
    while position < samples.numel():
        step = rng.randint(160, 8000)
        stream.push_audio(samples[position:position + step])
        position += step


ENCODERS = [(attn_type, False) for attn_type in ATTN_TYPES] + [("leap", True), ("softmax", True)]


@pytest.mark.parametrize("attn_type,unit_causal", ENCODERS)
def test_streamed_encoder_equals_offline_encoder(attn_type, unit_causal, utterances, cmvn):
    """Prefix consistency: audio pushed in random 10-500 ms chunks through fbank, CMVN, the
    causal subsampler and the encoder (causal, or unit-causal over 3-frame units) gives the
    offline encoder's states within 1e-4."""
    model, _ = build_s2t_model(attn_type, unit_causal=unit_causal)
    rng = random.Random(0)
    for samples in utterances:
        features = cmvn(fbank(samples))
        offline = model.encoder(features[None], torch.tensor([features.size(0)]))
        offline = offline["encoder_out"][0]
        stream = model.start_stream(cmvn=cmvn)
        push_in_random_chunks(stream, samples, rng)
        if unit_causal:  # whole units only, so far
            assert stream.encoded == offline.size(0) // 3 * 3
        stream.finish_source()
        # nothing was predicted, so every encoder state is still pending in the stream
        assert stream.encoded == offline.size(0) == stream.encoder_positions_computed
        torch.testing.assert_close(stream.pending, offline, rtol=0, atol=1e-4)


# ------------------------------------------------------------ streaming == offline decode
def stream_translate(model, samples, cmvn, rng, recompute=False, eos_before_end=False):
    """Read random 10-500 ms chunks (the last one with the end of the source, as SimulEval
    sends it), write whenever wait-k allows, until EOS."""
    stream = model.start_stream(cmvn=cmvn, recompute=recompute, eos_before_end=eos_before_end)
    position = 0
    while not stream.finished:
        if stream.ready_to_write():
            stream.predict()
        else:
            step = rng.randint(160, 8000)
            stream.push_audio(samples[position:position + step])
            position += step
            if position >= samples.numel():
                stream.finish_source()
    return stream


@pytest.mark.parametrize("attn_type,unit_causal", ENCODERS)
def test_streamed_decoding_equals_offline_waitk_greedy(attn_type, unit_causal, utterances,
                                                       cmvn):
    model, _ = build_s2t_model(attn_type, unit_causal=unit_causal)
    # float64, so that no near-tie between two logits can flip a greedy choice between the
    # parallel and the recurrent forms
    model = model.double()
    rng = random.Random(1)
    distinct = set()
    for samples in utterances:
        offline = speech_waitk_greedy_decode(model, samples, cmvn)
        streamed = stream_translate(model, samples, cmvn, rng)
        assert streamed.target == offline
        recomputed = stream_translate(model, samples, cmvn, rng, recompute=True)
        assert recomputed.target == offline
        early = stream_translate(model, samples, cmvn, rng, eos_before_end=True)
        assert early.target == speech_waitk_greedy_decode(model, samples, cmvn,
                                                          eos_before_end=True)
        distinct.add(tuple(offline))
        if attn_type == "leap":
            # each encoder frame computed once, each target token decoded once
            assert streamed.encoder_positions_computed == streamed.encoded
            assert streamed.decoder_positions_computed == len(streamed.target)
            assert recomputed.encoder_positions_computed > 3 * streamed.encoded
    assert len(distinct) > 1


def test_read_does_not_touch_decoder_state(utterances, cmvn):
    model, _ = build_s2t_model("leap")
    stream = model.start_stream(cmvn=cmvn)
    samples = utterances[0]
    position = 0
    while not stream.ready_to_write():
        stream.push_audio(samples[position:position + 1600])
        position += 1600
    stream.predict()
    before = {k: {n: t.clone() for n, t in v.items() if t is not None}
              for k, v in stream.decoder_state.items()}
    stream.push_audio(samples[position:position + 8000])
    after = stream.decoder_state
    assert before.keys() == after.keys()
    for key, buffers in before.items():
        for name, tensor in buffers.items():
            assert torch.equal(tensor, after[key][name]), (key, name)


def speech_stream_footprints(model, steps: int, at) -> dict:
    """Push 40 ms of noise per step (one encoder frame each) and predict whatever wait-k allows
    (no EOS before the end of the source, which never comes); the state footprint after the
    steps ``at``."""
    generator = torch.Generator().manual_seed(0)
    stream = model.start_stream()
    footprints = {}
    for step in range(1, steps + 1):
        stream.push_audio(torch.randn(640, generator=generator) * 3000)
        while stream.ready_to_write():
            stream.predict()
        if step in at:
            footprints[step] = state_footprint(stream)
    attention = model.encoder.self_attention_config
    unit = attention.frames_per_unit if attention.unit_causal else 1
    assert stream.encoded == steps // unit * unit  # unit-causal: whole units so far
    assert len(stream.target) == steps // 3 - 1  # wait-2 on units of 3 frames
    return footprints


@pytest.mark.parametrize("attn_type,unit_causal",
                         [(attn_type, False) for attn_type in LINEAR_ATTN_TYPES] + [("leap", True)])
def test_every_stream_state_entry_is_bounded_over_1000_steps(attn_type, unit_causal):
    """1,000 pushes of 40 ms (40 s of audio): subsampler, encoder (unit-causal: with its
    incomplete unit) and decoder states hold exactly as many entries and bytes after push 100
    as after push 1,000. Softmax is left out: its key/value caches grow by design, as the text
    stream's contrast test shows."""
    model, _ = build_s2t_model(attn_type, unit_causal=unit_causal)
    footprints = speech_stream_footprints(model, 1000, at=(100, 1000))
    assert footprints[100] == footprints[1000]


# ----------------------------------------------------------------------- wait-k in training
def test_training_cross_attention_follows_the_unit_schedule():
    """Target token i depends on encoder frames < (i + k) * frames_per_unit, and on the last of
    them."""
    model, _ = build_s2t_model("leap", waitk=2, frames_per_unit=3)
    features = torch.randn(1, 120, 80)
    encoder_out = model.encoder(features, torch.tensor([120]))
    frames = encoder_out["encoder_out"][0]
    prev = torch.tensor([[2, 5, 6, 7, 8, 9]])
    logits, _ = model.decoder(prev, encoder_out=encoder_out)

    def logits_with(changed):
        return model.decoder(prev, encoder_out={**encoder_out, "encoder_out": [changed]})[0]

    for i in range(prev.size(1)):
        boundary = (i + 2) * 3
        after, last = frames.clone(), frames.clone()
        after[boundary:] += 1.0
        last[boundary - 1] += 1.0
        torch.testing.assert_close(logits_with(after)[0, i], logits[0, i], rtol=0, atol=1e-5)
        assert not torch.allclose(logits_with(last)[0, i], logits[0, i], atol=1e-4)


def test_unit_causal_encoder_sees_its_unit_only():
    """Unit-causal over 3-frame units: frame t depends on frames up to the end of its unit,
    not beyond."""
    model, _ = build_s2t_model("leap", unit_causal=True)
    encoder = model.encoder
    x = torch.randn(1, 60, 80)
    base = encoder(x, torch.tensor([60]))["encoder_out"][0]
    # the causal convs make subsampled frame j read features 0 .. 4j: changing features 20..
    # changes frame 5 first, and through attention its unit-mates 3 and 4, not frames 0..2
    changed = x.clone()
    changed[:, 20:] += 1.0
    out = encoder(changed, torch.tensor([60]))["encoder_out"][0]
    torch.testing.assert_close(out[:3], base[:3], rtol=0, atol=1e-6)
    assert not torch.allclose(out[3], base[3], atol=1e-4)


def test_offline_model_and_options():
    model, _ = build_s2t_model("leap", model_class=LeaPformerS2TTransformerModel)
    assert isinstance(model.encoder.subsampler, Conv1dSubsampler)
    assert not hasattr(model, "start_stream")
    out = model.encoder(torch.randn(2, 50, 80), torch.tensor([50, 31]))
    assert out["encoder_out"][0].shape == (13, 2, 64)
    with pytest.raises(ValueError, match="--waitk-lagging"):
        build_s2t_model("leap", waitk=0)
    for units in (0, -1):
        with pytest.raises(ValueError, match=f"--frames-per-unit must be > 0, got {units}"):
            build_s2t_model("leap", frames_per_unit=units)
    unset, _ = build_s2t_model("leap", frames_per_unit=None)
    assert unset.decoder.cross_attention_config.frames_per_unit == 9


def test_frames_per_unit_zero_is_refused_on_the_command_line(capsys):
    parser = argparse.ArgumentParser()
    LeaPformerS2TWaitkModel.add_args(parser)
    assert parser.parse_args(["--frames-per-unit", "4"]).frames_per_unit == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["--frames-per-unit", "0"])
    assert ("argument --frames-per-unit/--fixed-pre-decision-ratio: --frames-per-unit must be "
            "> 0, got 0" in capsys.readouterr().err)


def test_old_option_names_are_aliases_on_the_command_line_and_in_saved_args():
    """``--fixed-pre-decision-ratio`` and ``--chunk-causal-encoder`` (the names before
    ``--frames-per-unit`` and ``--unit-causal-encoder``) parse to the new options, and args saved
    under the old names build the same model."""
    parser = argparse.ArgumentParser()
    LeaPformerS2TWaitkModel.add_args(parser)
    parsed = parser.parse_args(["--fixed-pre-decision-ratio", "4", "--chunk-causal-encoder"])
    assert (parsed.frames_per_unit, parsed.unit_causal_encoder) == (4, True)
    new, _ = build_s2t_model("leap", frames_per_unit=4, unit_causal=True)
    saved = argparse.Namespace(arch="leapformer_s2t_waitk_tiny", waitk_lagging=2,
                               fixed_pre_decision_ratio=4, chunk_causal_encoder=True,
                               frames_per_unit=None, unit_causal_encoder=False,
                               input_feat_per_channel=80, input_channels=1)
    ARCH_CONFIG_REGISTRY[saved.arch](saved)
    torch.manual_seed(0)
    task = SimpleNamespace(target_dictionary=new.decoder.dictionary)
    old = LeaPformerS2TWaitkModel.build_model(saved, task)
    assert (saved.frames_per_unit, saved.unit_causal_encoder) == (4, True)
    assert not hasattr(saved, "fixed_pre_decision_ratio")
    assert old.encoder.self_attention_config == new.encoder.self_attention_config
    assert old.decoder.cross_attention_config == new.decoder.cross_attention_config
    conflicting = argparse.Namespace(fixed_pre_decision_ratio=4, frames_per_unit=5)
    with pytest.raises(ValueError, match="--fixed-pre-decision-ratio 4 and --frames-per-unit 5 "
                                         "are one option"):
        LeaPformerS2TWaitkModel.upgrade_args(conflicting)


def test_missing_pretrained_encoder_is_an_error(tmp_path):
    args = argparse.Namespace(
        arch="leapformer_s2t_waitk_tiny", waitk_lagging=2, input_feat_per_channel=80,
        input_channels=1, max_source_positions=6000, max_target_positions=1024,
        load_pretrained_encoder_from=str(tmp_path / "asr.pt"))
    ARCH_CONFIG_REGISTRY[args.arch](args)
    with pytest.raises(FileNotFoundError, match="--load-pretrained-encoder-from.*asr.pt"):
        LeaPformerS2TWaitkModel.build_model(
            args, SimpleNamespace(target_dictionary=Dictionary()))


def test_no_eos_before_the_window_covers_the_utterance(utterances, cmvn):
    """By default a speech stream predicts EOS only once token i's window
    (i + k) * frames_per_unit covers every encoder frame: the translation runs to the end of the
    audio."""
    model, dictionary = build_s2t_model("leap")
    with torch.no_grad():  # make EOS the most likely token everywhere
        model.decoder.output_projection.bias = torch.nn.Parameter(
            torch.zeros(len(dictionary)).index_fill(0, torch.tensor([dictionary.eos()]), 1e3))
    samples = utterances[0]
    streamed = stream_translate(model, samples, cmvn, random.Random(0))
    frames = streamed.encoded
    assert len(streamed.target) - 1 + 2 == -(-frames // 3)  # first i with (i + 2) * 3 >= frames
    assert streamed.target[-1] == dictionary.eos()
    assert stream_translate(model, samples, cmvn, random.Random(0),
                            eos_before_end=True).target == [dictionary.eos()]


def test_audio_too_short_for_one_frame_translates_to_nothing(cmvn):
    model, dictionary = build_s2t_model("leap")
    samples = torch.randn(300) * 1000  # less than one 25 ms fbank window
    assert speech_waitk_greedy_decode(model, samples, cmvn) == [dictionary.eos()]
    for recompute in (False, True):
        stream = model.start_stream(cmvn=cmvn, recompute=recompute)
        stream.push_audio(samples)
        stream.finish_source()
        assert stream.predict() == dictionary.eos() and stream.finished


def test_push_audio_after_the_end_is_named():
    model, _ = build_s2t_model("leap")
    stream = model.eval().start_stream()
    stream.push_audio(torch.zeros(1600))
    stream.finish_source()
    with pytest.raises(RuntimeError, match="push_audio after finish_source"):
        stream.push_audio(torch.zeros(160))
