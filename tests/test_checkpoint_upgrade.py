"""Checkpoints saved before the option renames load and decode as they did.

``tests/fixtures/pre_rename/`` holds a tiny text and a tiny speech wait-k checkpoint saved by the
code of commit d910b5d, the last before ``--fixed-pre-decision-ratio`` became
``--frames-per-unit`` and ``--chunk-causal-encoder`` became ``--unit-causal-encoder``, and the
tokens and log-probabilities that code decoded (``expected.json``). How they were made:
``tests/fixtures/make_pre_rename_checkpoints.py``.

The tokens must be equal; the greedy choices were made with margins of at least 0.018 nats
(``smallest_margin``), far above float rounding, and the log-probabilities must agree to 1e-4.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from leapformer_fairseq.audio import fbank
from leapformer_fairseq.models.streaming import (
    load_streaming_model,
    speech_waitk_greedy_decode,
    waitk_greedy_decode,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PRE_RENAME = FIXTURES / "pre_rename"
EXPECTED = json.loads((PRE_RENAME / "expected.json").read_text())


def fixture_maker():
    spec = importlib.util.spec_from_file_location(
        "make_pre_rename_checkpoints", FIXTURES / "make_pre_rename_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decode_stream(stream, pieces, push):
    """Push each piece, write whenever wait-k allows, then finish: the target tokens."""
    for piece in pieces:
        push(piece)
        while stream.ready_to_write() and not stream.finished:
            stream.predict()
    stream.finish_source()
    while not stream.finished:
        stream.predict()
    return stream.target


def assert_decodes_as_saved(model, net_input, stream_target, offline_target, expected):
    assert stream_target == expected["stream"]
    assert offline_target == expected["offline"]
    maker = fixture_maker()
    with torch.no_grad():
        logprobs, _ = maker.teacher_forced_logprobs(model, net_input, stream_target)
    torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float64),
                               torch.tensor(expected["logprobs"], dtype=torch.float64),
                               rtol=0, atol=1e-4)


def test_the_fixtures_were_saved_under_the_old_option_names():
    """The speech checkpoint's saved args name the options as they were before the renames."""
    state = torch.load(PRE_RENAME / "s2t" / "checkpoint.pt", weights_only=False)
    saved = vars(state["cfg"]["model"])
    assert (saved["fixed_pre_decision_ratio"], saved["chunk_causal_encoder"]) == (3, True)
    assert "frames_per_unit" not in saved and "unit_causal_encoder" not in saved


@pytest.mark.usefixtures("one_torch_thread")
def test_text_checkpoint_decodes_as_before():
    model, task = load_streaming_model(str(PRE_RENAME / "t2t" / "checkpoint.pt"),
                                       str(PRE_RENAME / "t2t"))
    expected = EXPECTED["t2t"]
    source = expected["source"]
    stream = model.start_stream()
    target = decode_stream(stream, [[token] for token in source], stream.push_source)
    src = torch.tensor([source + [task.source_dictionary.eos()]])
    net_input = {"src_tokens": src, "src_lengths": torch.tensor([src.size(1)])}
    assert_decodes_as_saved(model, net_input, target, waitk_greedy_decode(model, source),
                            expected)


@pytest.mark.usefixtures("one_torch_thread")
def test_speech_checkpoint_decodes_as_before_under_the_new_names():
    model, _ = load_streaming_model(str(PRE_RENAME / "s2t" / "checkpoint.pt"),
                                    str(PRE_RENAME / "s2t"))
    encoder = model.encoder.self_attention_config
    cross = model.decoder.cross_attention_config
    assert (encoder.unit_causal, encoder.frames_per_unit, cross.frames_per_unit) == (True, 3, 3)
    expected = EXPECTED["s2t"]
    audio = fixture_maker().chirp(0.6)
    assert expected["audio"] == "chirp(0.6)"
    stream = model.start_stream()
    target = decode_stream(stream, audio.split(1600), stream.push_audio)
    features = fbank(audio)[None]
    net_input = {"src_tokens": features, "src_lengths": torch.tensor([features.size(1)])}
    assert_decodes_as_saved(model, net_input, target, speech_waitk_greedy_decode(model, audio),
                            expected)
