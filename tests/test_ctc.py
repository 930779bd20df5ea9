"""CTC on the speech encoder, trained through fairseq's ``label_smoothed_cross_entropy_with_ctc``
(``--ctc-weight``): the model's CTC layer beside the encoder, and the criterion's CTC loss against
``F.ctc_loss`` of each utterance encoded on its own, with its targets without ``</s>``."""
from types import SimpleNamespace
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from fairseq.criterions.label_smoothed_cross_entropy_with_ctc import (
    LabelSmoothedCrossEntropyWithCtcCriterion,
)
from fairseq.data import Dictionary
from test_decoder_init import build_st

from leapformer_fairseq.models import LeaPformerS2TWaitkModel

CTC_WEIGHT = 0.3


def target_dictionary() -> Dictionary:
    dictionary = Dictionary()
    for index in range(20):
        dictionary.add_symbol(f"w{index}")
    return dictionary


def build(dictionary: Dictionary, **options) -> LeaPformerS2TWaitkModel:
    """The tiny S2T wait-k model (:func:`build_st`) in float64 and evaluation mode."""
    model, _ = build_st(dictionary, **options)
    return model.double().eval()


def batch(dictionary: Dictionary) -> Tuple[Dict, List[torch.Tensor], List[torch.Tensor]]:
    """Two right-padded utterances (60 and 37 frames) with 5 and 3 target tokens plus
    ``</s>``: fairseq's S2T batch, and each utterance's features and tokens."""
    generator = torch.Generator().manual_seed(1)
    lengths = [60, 37]
    features = [torch.randn(n, 80, generator=generator, dtype=torch.float64) for n in lengths]
    tokens = [torch.tensor([4, 5, 6, 7, 8]), torch.tensor([9, 10, 11])]
    eos, pad = torch.tensor([dictionary.eos()]), dictionary.pad()
    sources = torch.zeros(2, max(lengths), 80, dtype=torch.float64)
    target = torch.full((2, 6), pad)
    previous = torch.full((2, 6), pad)
    for row, (frames, words) in enumerate(zip(features, tokens)):
        sources[row, :len(frames)] = frames
        target[row, :len(words) + 1] = torch.cat([words, eos])
        previous[row, :len(words) + 1] = torch.cat([eos, words])
    sample = {
        "id": torch.arange(2),
        "net_input": {"src_tokens": sources, "src_lengths": torch.tensor(lengths),
                      "prev_output_tokens": previous},
        "target": target, "target_lengths": torch.tensor([6, 4]), "ntokens": 10,
    }
    return sample, features, tokens


def criterion(dictionary: Dictionary, ctc_weight: float):
    return LabelSmoothedCrossEntropyWithCtcCriterion(
        SimpleNamespace(target_dictionary=dictionary), sentence_avg=False,
        label_smoothing=0.1, ignore_prefix_size=0, report_accuracy=False,
        ctc_weight=ctc_weight)


def test_the_criterions_ctc_loss_is_each_utterances_own():
    """The criterion's CTC term on a padded batch equals ``CTC_WEIGHT`` times the sum over
    utterances of ``F.ctc_loss`` (blank 0) of the CTC layer on that utterance encoded alone,
    against its tokens without ``</s>``; the cross-entropy term is unchanged by CTC."""
    dictionary = target_dictionary()
    model = build(dictionary, ctc_weight=CTC_WEIGHT)
    sample, features, tokens = batch(dictionary)
    loss, _, logging = criterion(dictionary, CTC_WEIGHT)(model, sample)
    reference = 0.0
    for frames, words in zip(features, tokens):
        states = model.encoder(frames[None], torch.tensor([len(frames)]))["encoder_out"][0]
        log_probs = F.log_softmax(model.ctc_projection(states), dim=-1)
        reference += F.ctc_loss(log_probs, words[None], [states.shape[0]], [len(words)],
                                blank=0, reduction="sum")
    torch.testing.assert_close(torch.tensor(logging["ctc_loss"], dtype=torch.float64),
                               CTC_WEIGHT * reference, rtol=1e-5, atol=0)
    without, _, _ = criterion(dictionary, 0.0)(model, sample)
    torch.testing.assert_close((loss - without).double(), CTC_WEIGHT * reference, rtol=1e-5,
                               atol=0)


def test_the_ctc_layer_sits_beside_the_encoder():
    """An ST model takes the encoder's parameters (``--load-pretrained-encoder-from`` copies
    ``encoder.*``) and none of the CTC layer; without ``--ctc-weight`` there is none."""
    dictionary = target_dictionary()
    model = build(dictionary, ctc_weight=CTC_WEIGHT)
    assert model.ctc_projection.weight.shape == (len(dictionary), 64)
    assert {"ctc_projection.weight", "ctc_projection.bias"} <= model.state_dict().keys()
    assert not any("ctc" in key for key in model.encoder.state_dict())
    plain = build(dictionary)
    assert plain.ctc_projection is None
    assert plain.encoder.state_dict().keys() == model.encoder.state_dict().keys()
    sample, _, _ = batch(dictionary)
    with pytest.raises(ValueError, match="no CTC layer; train it with --criterion "
                                           "label_smoothed_cross_entropy_with_ctc"):
        plain.get_ctc_output(plain(**sample["net_input"]), sample)
