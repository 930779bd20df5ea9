"""The streaming API of the wait-k model against offline wait-k greedy decoding."""
import argparse
import random
from types import SimpleNamespace
from typing import Dict, Sequence, Tuple

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY
from fairseq.modules import SinusoidalPositionalEmbedding

import leapformer_fairseq  # noqa: F401  (registers the models)
from leapformer_fairseq.models import LeaPformerWaitkTransformerModel
from leapformer_fairseq.models.streaming import waitk_greedy_decode
from leapformer_fairseq.modules import ATTN_TYPES, LINEAR_ATTN_TYPES, sinusoidal_rows

VOCAB = 24
PAD = Dictionary().pad()


def build_waitk_model(attn_type, waitk=3, seed=0, **options):
    """A tiny wait-k model with seeded random weights, float64, eval mode; ``options`` are more
    fairseq args."""
    torch.manual_seed(seed)
    dictionary = Dictionary()
    for i in range(VOCAB):
        dictionary.add_symbol(f"w{i}")
    args = argparse.Namespace(**{
        "arch": "leapformer_waitk_transformer_tiny", "waitk_lagging": waitk,
        "encoder_attn_type": attn_type, "decoder_attn_type": attn_type,
        "cross_attn_type": attn_type, "dropout": 0.0, "max_source_positions": 1024,
        "max_target_positions": 1024, **options,
    })
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


def stream_translate(model, source, seed, recompute=False, waitk=None):
    """Read in random groups of 1-3 tokens (like words of SentencePiece pieces), write when
    wait-k allows, until EOS."""
    rng = random.Random(seed)
    stream = model.start_stream(recompute=recompute, waitk=waitk)
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


@pytest.mark.parametrize("attn_type,options",
                         [(attn_type, {}) for attn_type in ATTN_TYPES]
                         + [("leap", {"leap_input_norm": True}),
                            ("leap", {"leap_feature_map": "hedgehog"})])
def test_streaming_equals_offline_waitk_greedy(attn_type, options):
    model, dictionary = build_waitk_model(attn_type, **options)
    leap_blocks = [module for module in model.modules() if hasattr(module, "leap_q")]
    assert all(isinstance(module.leap_q[0], torch.nn.LayerNorm) ==
               options.get("leap_input_norm", False) for module in leap_blocks)
    assert all(hasattr(module, "hedgehog_q") == ("leap_feature_map" in options)
               for module in leap_blocks)
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
    assert state_footprint(early) == state_footprint(streamed)


def state_footprint(stream) -> Tuple[int, int]:
    """``(bytes, entries)`` of everything in the stream's ``encoder_state`` and
    ``decoder_state``, walked recursively with no key left out: every dict, list, tuple, tensor,
    number and ``None`` is an entry; tensors count their bytes, numbers 8. Any other type fails,
    so nothing can hide from the count."""

    def walk(entry) -> Tuple[int, int]:
        if isinstance(entry, dict):
            entry = list(entry.values())
        if isinstance(entry, (list, tuple)):
            sizes = [walk(item) for item in entry]
            return sum(size for size, _ in sizes), 1 + sum(count for _, count in sizes)
        if isinstance(entry, torch.Tensor):
            return entry.numel() * entry.element_size(), 1
        if isinstance(entry, (int, float)):
            return 8, 1
        if entry is None:
            return 0, 1
        raise TypeError(f"unexpected {type(entry).__name__} in a stream state")

    return walk([stream.encoder_state, stream.decoder_state])


def text_stream_footprints(model, steps: int, at: Sequence[int]) -> Dict[int, Tuple[int, int]]:
    """Push one random source token per step and predict whatever wait-k allows (EOS only at
    the end of the source, which never comes); the state footprint after the steps ``at``."""
    rng = random.Random(0)
    stream = model.start_stream(eos_before_end=False)
    footprints = {}
    for step in range(1, steps + 1):
        stream.push_source([rng.randrange(4, VOCAB + 4)])
        while stream.ready_to_write():
            stream.predict()
        if step in at:
            footprints[step] = state_footprint(stream)
    assert len(stream.target) == steps - 2  # wait-3: one target token per source token
    return footprints


@pytest.mark.parametrize("attn_type,options",
                         [(attn_type, {}) for attn_type in LINEAR_ATTN_TYPES]
                         + [("leap", {"leap_feature_map": "hedgehog"})])
def test_every_stream_state_entry_is_bounded_over_1000_steps(attn_type, options):
    """1,000 READ + WRITE steps (positions stay below the tiny model's 1,024): the encoder and
    decoder states hold exactly as many entries and bytes after step 100 as after step 1,000."""
    model, _ = build_waitk_model(attn_type, **options)
    footprints = text_stream_footprints(model, 1000, at=(100, 1000))
    assert footprints[100] == footprints[1000]


def test_softmax_stream_state_grows_linearly():
    """The contrast: softmax keeps key/value caches, which grow by the same bytes every step
    (in the same entries)."""
    model, _ = build_waitk_model("softmax")
    footprints = text_stream_footprints(model, 1000, at=(100, 550, 1000))
    (early, entries), (middle, _), (late, _) = (footprints[step] for step in (100, 550, 1000))
    assert late - middle == middle - early > 0
    assert {count for _, count in footprints.values()} == {entries}


def test_sinusoidal_stream_positions_equal_fairseq_table_bit_for_bit():
    for dim in (32, 33):  # odd dimensions are zero-padded
        positions = torch.tensor([0, 1, 2, 63, 1023, 1024, 2999])
        table = SinusoidalPositionalEmbedding.get_embedding(3000 + PAD + 1, dim, PAD)
        assert torch.equal(sinusoidal_rows(positions, dim, PAD), table[positions + PAD + 1])


def test_stream_past_the_position_table_does_not_grow_it():
    """A stream past the sinusoidal table's positions computes its rows, equal to the offline
    encoder's, and leaves fairseq's table as it was."""
    model, _ = build_waitk_model("leap", max_source_positions=16)
    encoder = model.encoder
    table = encoder.embed_positions.weights
    tokens = torch.randint(4, VOCAB + 4, (1, 40))
    state = {}
    streamed = torch.cat([encoder.forward_new_tokens(tokens[:, start:start + 8], start, state)
                          for start in range(0, 40, 8)])
    assert encoder.embed_positions.weights is table and table.size(0) == 16 + PAD + 1
    offline = encoder(tokens, src_lengths=torch.tensor([40]))["encoder_out"][0]
    torch.testing.assert_close(streamed, offline, rtol=0, atol=1e-10)


def test_decoder_stream_past_its_position_table_does_not_grow_it():
    """A target longer than the decoder's sinusoidal table (``--max-target-positions`` 16):
    every incremental step computes its own position row and leaves fairseq's table as it was
    (fairseq would rebuild the whole table at every step), and the stream still equals offline
    wait-k greedy decoding. The target (over 128 tokens) also outgrows twice the stream's buffer
    of ``[EOS] + target`` (64 tokens, doubled as needed)."""
    model, dictionary = build_waitk_model("leap", waitk=1, max_target_positions=16)
    with torch.no_grad():  # no EOS
        model.decoder.output_projection.weight[dictionary.eos()] = -1e3
    table = model.decoder.embed_positions.weights
    source = random_sentences(dictionary, count=1, seed=3)[0][:10]
    stream = model.start_stream(max_len_b=140)
    stream.push_source(source)
    stream.finish_source()
    while not stream.finished:
        stream.predict()
    assert len(stream.target) > 128
    assert model.decoder.embed_positions.weights is table and table.size(0) == 16 + PAD + 1
    assert stream.target == waitk_greedy_decode(model, source, max_len_b=140)


def test_learned_positions_stream_until_max_source_positions():
    model, _ = build_waitk_model("leap", encoder_learned_pos=True, max_source_positions=8)
    tokens = torch.randint(4, VOCAB + 4, (1, 8))
    state = {}
    streamed = torch.cat([model.encoder.forward_new_tokens(tokens[:, :5], 0, state),
                          model.encoder.forward_new_tokens(tokens[:, 5:], 5, state)])
    offline = model.encoder(tokens, src_lengths=torch.tensor([8]))["encoder_out"][0]
    torch.testing.assert_close(streamed, offline, rtol=0, atol=1e-10)
    stream = model.start_stream()
    stream.push_source(tokens[0, :6].tolist())
    with pytest.raises(ValueError, match=r"source position 8 is past --max-source-positions 8 "
                                         r"\(learned positional embeddings\)"):
        stream.push_source([5, 6, 7, 8])


def test_learned_target_positions_stop_at_max_target_positions():
    """A stream of a decoder with learned positions predicts up to ``--max-target-positions``
    tokens, then refuses naming the option (fairseq would fail with an IndexError). The text
    stream keeps the count of source tokens, not the tokens (outside recompute mode)."""
    model, dictionary = build_waitk_model("leap", waitk=1, decoder_learned_pos=True,
                                          max_target_positions=4)
    stream = model.start_stream(eos_before_end=False, max_len_b=100)
    stream.push_source([dictionary.nspecial] * 6)
    assert stream.source == [] and stream.source_length == 6
    with torch.no_grad():  # no EOS, so the stream runs into the limit
        model.decoder.output_projection.weight[dictionary.eos()] = -1e3
    for _ in range(4):
        stream.predict()
    with pytest.raises(ValueError, match=r"target position 4 is past --max-target-positions 4 "
                                         r"\(learned positional embeddings\)"):
        stream.predict()


def test_cosformer_stream_past_max_positions_is_an_error():
    model, _ = build_waitk_model("cosformer", cosformer_max_positions=8)
    stream = model.start_stream()
    stream.push_source([5] * 8)
    with pytest.raises(ValueError, match="cosFormer position 8 is past "
                                         "--cosformer-max-positions 8"):
        stream.push_source([5])


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


def test_stream_misuse_is_named():
    """A model in training mode, predicting after EOS and pushing after the end are refused,
    each naming what was wrong."""
    model, dictionary = build_waitk_model("leap", waitk=1)
    with pytest.raises(ValueError, match=r"streaming needs the model in eval mode"):
        model.train().start_stream()
    stream = model.eval().start_stream()
    stream.push_source([5, 6])
    stream.finish_source()
    with pytest.raises(RuntimeError, match="push_source after finish_source"):
        stream.push_source([7])
    while not stream.finished:
        stream.predict()
    with pytest.raises(RuntimeError, match="predict after EOS"):
        stream.predict()
