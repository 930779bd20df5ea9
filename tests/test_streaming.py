"""The streaming API of the wait-k model against offline wait-k greedy decoding."""
import argparse
import random
from types import SimpleNamespace

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY

import leapformer_fairseq  # noqa: F401  (registers the models)
from leapformer_fairseq.models import LeaPformerWaitkTransformerModel
from leapformer_fairseq.models.streaming import waitk_greedy_decode
from leapformer_fairseq.modules import ATTN_TYPES

VOCAB = 24


def build_waitk_model(attn_type, waitk=3, seed=0):
    torch.manual_seed(seed)
    dictionary = Dictionary()
    for i in range(VOCAB):
        dictionary.add_symbol(f"w{i}")
    args = argparse.Namespace(
        arch="leapformer_waitk_transformer_tiny", waitk_lagging=waitk,
        encoder_attn_type=attn_type, decoder_attn_type=attn_type, cross_attn_type=attn_type,
        dropout=0.0, max_source_positions=1024, max_target_positions=1024,
    )
    ARCH_CONFIG_REGISTRY[args.arch](args)
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    model = LeaPformerWaitkTransformerModel.build_model(args, task)
    with torch.no_grad():  # a sharper output layer, so greedy outputs vary between sentences
        model.decoder.output_projection.weight.mul_(8.0)
    # float64, so that no near-tie between two logits can flip a greedy choice between the
    # parallel and the recurrent forms (they agree to ~1e-6 in float32)
    return model.double().eval(), dictionary


def random_sentences(dictionary, count=20, seed=1):
    rng = random.Random(seed)
    first = dictionary.nspecial
    return [[rng.randrange(first, len(dictionary)) for _ in range(rng.randint(1, 15))]
            for _ in range(count)]


def stream_translate(model, source, seed, recompute=False):
    """Read in random groups of 1-3 tokens (like words of SentencePiece pieces), write when
    wait-k allows, until EOS."""
    rng = random.Random(seed)
    stream = model.start_stream(recompute=recompute)
    position = 0
    while not stream.finished:
        if stream.ready_to_write():
            stream.predict()
        elif position < len(source):
            step = rng.randint(1, 3)
            stream.push_source(source[position:position + step])
            position += step
            if position >= len(source):
                stream.finish_source()
    return stream


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_streaming_equals_offline_waitk_greedy(attn_type):
    model, dictionary = build_waitk_model(attn_type)
    outputs = []
    for index, source in enumerate(random_sentences(dictionary)):
        offline = waitk_greedy_decode(model, source)
        assert stream_translate(model, source, seed=index).target == offline
        assert stream_translate(model, source, seed=index, recompute=True).target == offline
        outputs.append(tuple(offline))
    assert len(set(outputs)) > 10, "degenerate outputs would make this test vacuous"


def test_streaming_work_per_step_does_not_grow_for_leap():
    model, dictionary = build_waitk_model("leap")
    source = random_sentences(dictionary, count=1, seed=5)[0] * 3  # 3x longer
    streamed = stream_translate(model, source, seed=0)
    recomputed = stream_translate(model, source, seed=0, recompute=True)
    assert streamed.target == recomputed.target
    # every source token (and EOS) runs through the encoder exactly once, every target token
    # through the decoder exactly once
    assert streamed.encoder_positions_computed == len(source) + 1
    assert streamed.decoder_positions_computed == len(streamed.target)
    # re-encoding the prefix at every prediction is quadratic
    assert recomputed.encoder_positions_computed > 3 * streamed.encoder_positions_computed
    # the recurrent states do not grow with the prefix: no key/value caches anywhere
    early = model.start_stream()
    early.push_source(source[:3])
    early.predict()
    assert state_shapes(early) == state_shapes(streamed)


def state_shapes(stream):
    """Shapes of every tensor in the layers' incremental states."""
    return {(key, name): tuple(tensor.shape)
            for state in (stream.encoder_state, stream.decoder_state)
            for key, buffer in state.items() if isinstance(buffer, dict)
            for name, tensor in buffer.items() if tensor is not None}


def test_read_does_not_touch_the_decoder_state():
    model, dictionary = build_waitk_model("leap")
    stream = model.start_stream()
    stream.push_source([5, 6, 7])
    stream.predict()
    snapshot = {key: {name: t.clone() for name, t in buffer.items()}
                for key, buffer in stream.decoder_state.items()}
    stream.push_source([8, 9])
    for key, buffer in stream.decoder_state.items():
        for name, tensor in buffer.items():
            assert torch.equal(tensor, snapshot[key][name]), (key, name)


def test_predict_before_wait_k_is_an_error():
    model, _ = build_waitk_model("leap", waitk=3)
    stream = model.start_stream()
    stream.push_source([5, 6])
    with pytest.raises(RuntimeError, match="wait-3 needs 3 source units"):
        stream.predict()
