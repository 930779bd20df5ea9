"""Make fairseq checkpoints load under torch >= 2.6, and load self-contained.

torch 2.6 made ``torch.load`` default to ``weights_only=True``, which refuses the
``argparse.Namespace`` and omegaconf objects every fairseq checkpoint holds, so
``fairseq-generate`` and ``--restore-file`` fail. Importing this plugin (``--user-dir`` does)
points the modules of fairseq that read its own checkpoints at a ``torch`` whose ``load``
defaults to ``weights_only=False``. ``torch.load`` itself, and every other caller, is untouched.

Options renamed since a checkpoint was saved are renamed in its args when the model is built
(:func:`rename_args`, called by each model's ``upgrade_args``), so old checkpoints load.

A model built from a checkpoint's saved args must not read the files it was initialised from in
training (``--load-pretrained-encoder-from``, ``--load-pretrained-decoder-from``): they may be
gone. :func:`record_initialisation` turns those options into records, both when the model is
initialised for training and in every checkpoint fairseq reads (so checkpoints saved before that
change load too).
"""
import importlib
from argparse import Namespace
from collections.abc import MutableMapping
from contextlib import nullcontext
from types import ModuleType
from typing import Any, Mapping

import torch
from omegaconf import OmegaConf, open_dict

# fairseq modules that unpickle fairseq's own files with ``torch.load``.
CHECKPOINT_READERS = ("fairseq.checkpoint_utils", "fairseq.distributed.utils")


# the options naming a file a component is initialised from, and the records they become
INITIALISATIONS = {"load_pretrained_encoder_from": "encoder_initialized_from",
                   "load_pretrained_decoder_from": "decoder_initialized_from"}


def record_initialisation(args: Any) -> None:
    """Move each option of ``INITIALISATIONS`` (a path read when the model is built) to its
    record (``encoder_initialized_from``, ``decoder_initialized_from``) in model args: a
    Namespace (legacy models, as ours) or a mapping (dataclass configs); anything else, or args
    without the paths, is left as it is."""
    if isinstance(args, Namespace):
        args = vars(args)
    if not isinstance(args, MutableMapping):
        return
    for option, record in INITIALISATIONS.items():
        if args.get(option):
            with open_dict(args) if OmegaConf.is_config(args) else nullcontext():
                args[record] = args[option]
                args[option] = None


def as_namespace(args: Any) -> Any:
    """Model args as an argparse Namespace: ``fairseq-hydra-train`` hands a legacy model an
    omegaconf config, from which fairseq's ``TransformerConfig.from_namespace`` would keep only
    its own fields and drop ours. A Namespace is returned as it is."""
    if OmegaConf.is_config(args):
        return Namespace(**OmegaConf.to_container(args, resolve=True))
    return args


def rename_args(args: Any, renames: Mapping[str, str]) -> None:
    """Move each old option name's value to its new name in model args (a Namespace, or a
    mapping such as an omegaconf config), and drop the old name. The old name's value is kept
    where the new name is unset (``None``, or ``False`` for a flag); two different values set
    under both names are a ``ValueError`` naming both."""
    values = vars(args) if isinstance(args, Namespace) else args
    if not isinstance(values, MutableMapping):
        return
    with open_dict(values) if OmegaConf.is_config(values) else nullcontext():
        for old, new in renames.items():
            if old not in values:
                continue
            value = values.pop(old)
            if value is None:
                continue
            if values.get(new) not in (None, False) and values[new] != value:
                raise ValueError(f"--{old.replace('_', '-')} {value} and "
                                 f"--{new.replace('_', '-')} {values[new]} are one option "
                                 f"(the old and the new name); give --{new.replace('_', '-')} "
                                 "only")
            values[new] = value


class _TorchForFairseqCheckpoints:
    """Forwards every attribute to ``torch``; ``load`` defaults to ``weights_only=False``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        kwargs.setdefault("weights_only", False)
        state = torch.load(f, *args, **kwargs)
        if isinstance(state, dict):  # the training args: legacy "args", or "cfg" -> "model"
            record_initialisation(state.get("args"))
            cfg = state.get("cfg")
            if isinstance(cfg, MutableMapping):
                record_initialisation(cfg.get("model"))
        return state


def allow_fairseq_checkpoints() -> None:
    """Install the shim in each fairseq module of :data:`CHECKPOINT_READERS` (idempotent)."""
    for name in CHECKPOINT_READERS:
        module: ModuleType = importlib.import_module(name)
        if not isinstance(module.torch, _TorchForFairseqCheckpoints):
            module.torch = _TorchForFairseqCheckpoints()
