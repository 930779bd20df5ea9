"""Wait-k training is batch-invariant: each sentence's logits and label-smoothed loss in a padded
batch equal those of the sentence alone, for every attention type.

The batches come from fairseq's own collation, so the padding is what training sees: text
sources left-padded and targets right-padded (``language_pair_dataset.collate``), speech
features right-padded (``_collate_frames``, as ``SpeechToTextDataset.collater``).
"""
import argparse
from types import SimpleNamespace
from typing import Dict, List, Tuple

import pytest
import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.data import Dictionary, data_utils
from fairseq.data.audio.speech_to_text_dataset import _collate_frames
from fairseq.data.language_pair_dataset import collate
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY
from torch import Tensor

import leapformer_fairseq  # noqa: F401  (registers the models)
from leapformer_fairseq.modules import ATTN_TYPES

SOURCE_LENGTHS = [3, 11, 6, 1, 8]  # text tokens before EOS
FRAME_LENGTHS = [37, 90, 58, 5, 71]  # speech fbank frames (10, 23, 15, 2, 18 encoder frames)
TARGET_LENGTHS = [5, 2, 9, 4, 7]  # target tokens before EOS
TOLERANCE = dict(rtol=0, atol=1e-10)  # float64
LABEL_SMOOTHING = 0.1


def build(arch: str, attn_type: str, **options) -> Tuple[torch.nn.Module, Dictionary]:
    """A tiny model with seeded random weights, one attention type everywhere, float64, eval."""
    torch.manual_seed(0)
    dictionary = Dictionary()
    for i in range(20):
        dictionary.add_symbol(f"w{i}")
    args = argparse.Namespace(
        arch=arch, waitk_lagging=2, encoder_attn_type=attn_type, decoder_attn_type=attn_type,
        cross_attn_type=attn_type, dropout=0.0, max_source_positions=1024,
        max_target_positions=1024, **options)
    ARCH_CONFIG_REGISTRY[arch](args)
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    return ARCH_MODEL_REGISTRY[arch].build_model(args, task).double().eval(), dictionary


def random_tokens(dictionary: Dictionary, length: int, generator: torch.Generator) -> Tensor:
    """``(length + 1,)`` random real tokens followed by EOS."""
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (length,), generator=generator)
    return torch.cat([tokens, torch.tensor([dictionary.eos()])])


def text_batch(dictionary: Dictionary, indices: List[int]) -> Dict:
    """fairseq's translation batch of the sentences ``indices`` (sorted by source length)."""
    generator = torch.Generator().manual_seed(1)
    samples = [{"id": i, "source": random_tokens(dictionary, SOURCE_LENGTHS[i], generator),
                "target": random_tokens(dictionary, TARGET_LENGTHS[i], generator)}
               for i in range(len(SOURCE_LENGTHS))]
    return collate([samples[i] for i in indices], dictionary.pad(), dictionary.eos(),
                   left_pad_source=True, left_pad_target=False)


def speech_batch(dictionary: Dictionary, indices: List[int]) -> Dict:
    """A speech-to-text batch of the utterances ``indices``, collated as
    ``SpeechToTextDataset.collater`` does: features right-padded with zeros, targets
    right-padded, ``prev_output_tokens`` with EOS moved to the front."""
    generator = torch.Generator().manual_seed(1)
    frames = [torch.randn(n, 80, generator=generator, dtype=torch.float64)
              for n in FRAME_LENGTHS]
    targets = [random_tokens(dictionary, n, generator) for n in TARGET_LENGTHS]
    chosen = [targets[i] for i in indices]
    return {
        "id": torch.tensor(indices),
        "net_input": {
            "src_tokens": _collate_frames([frames[i] for i in indices]),
            "src_lengths": torch.tensor([FRAME_LENGTHS[i] for i in indices]),
            "prev_output_tokens": data_utils.collate_tokens(
                chosen, dictionary.pad(), dictionary.eos(), left_pad=False,
                move_eos_to_beginning=True),
        },
        "target": data_utils.collate_tokens(chosen, dictionary.pad(), dictionary.eos(),
                                            left_pad=False),
    }


def per_sentence(model: torch.nn.Module, batch: Dict, pad: int) -> Dict[int, Tuple[Tensor,
                                                                                   Tensor]]:
    """Sentence id -> (logits ``(T_i, V)`` of its real target positions, its summed
    label-smoothed loss)."""
    logits, _ = model(**batch["net_input"])
    lprobs = torch.log_softmax(logits, dim=-1)
    loss, _ = label_smoothed_nll_loss(lprobs, batch["target"], LABEL_SMOOTHING,
                                      ignore_index=pad, reduce=False)
    real = batch["target"].ne(pad)
    return {int(sentence): (logits[row][real[row]], loss[row].sum())
            for row, sentence in enumerate(batch["id"])}


def assert_batch_invariant(model: torch.nn.Module, dictionary: Dictionary, make_batch) -> None:
    ids = list(range(len(TARGET_LENGTHS)))
    with torch.no_grad():
        batched = per_sentence(model, make_batch(dictionary, ids), dictionary.pad())
        for sentence in ids:
            (logits, loss), = per_sentence(model, make_batch(dictionary, [sentence]),
                                           dictionary.pad()).values()
            assert torch.isfinite(batched[sentence][0]).all()
            torch.testing.assert_close(batched[sentence][0], logits, **TOLERANCE)
            torch.testing.assert_close(batched[sentence][1], loss, **TOLERANCE)


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_text_waitk_training_is_batch_invariant(attn_type):
    """Left-padded sources: the causal encoder, positions and the wait-k key limits of every
    sentence start at its first real token."""
    model, dictionary = build("leapformer_waitk_transformer_tiny", attn_type)
    batch = text_batch(dictionary, list(range(len(SOURCE_LENGTHS))))
    assert batch["net_input"]["src_tokens"][:, 0].eq(dictionary.pad()).any()  # left padding
    assert_batch_invariant(model, dictionary, text_batch)


@pytest.mark.parametrize("attn_type,unit_causal",
                         [(attn_type, False) for attn_type in ATTN_TYPES]
                         + [("leap", True), ("softmax", True)])
def test_speech_waitk_training_is_batch_invariant(attn_type, unit_causal):
    """Right-padded features: the causal subsampler, the (chunk-)causal encoder and the wait-k
    key limits on units of 3 encoder frames see each utterance's real frames only."""
    model, dictionary = build("leapformer_s2t_waitk_tiny", attn_type, input_feat_per_channel=80,
                              input_channels=1, frames_per_unit=3,
                              unit_causal_encoder=unit_causal)
    assert_batch_invariant(model, dictionary, speech_batch)
