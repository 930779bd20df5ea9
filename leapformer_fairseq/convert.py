"""A trained checkpoint with other attention types, to fine-tune from (``--finetune-from-model``).

fairseq-train's ``--finetune-from-model`` loads a checkpoint's weights strictly, and a softmax
model has none of LeaP's parameters (its proportion MLPs; Hedgehog's feature maps). This builds
the model the checkpoint describes with the attention types replaced, copies every parameter
the two models share, and leaves the new ones as a fresh model initialises them with ``--seed``
(the values ``fairseq-train --seed`` would start from). Parameters only the old types have are
dropped. LeaP blocks re-weight the features the checkpoint's args name (``--leap-feature-map``:
hedgehog, unless the checkpoint was saved without the option, which means relu). The output
holds the new weights and args and no optimizer state, so it can be read only as a starting
point: ``--finetune-from-model`` resets the optimizer, learning-rate schedule and update count.

    python -m leapformer_fairseq.convert --checkpoint SOFTMAX.pt --attn-type leap --out INIT.pt
"""
import argparse
import copy
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from leapformer_fairseq.models.attention_config import ATTENTION_BLOCKS
from leapformer_fairseq.recipes.config import ConfigError, attention_types


def convert_state(state: Dict, task, types: Dict[str, str], seed: int) -> Dict[str, List[str]]:
    """Replace ``state``'s model (a checkpoint as fairseq's ``load_checkpoint_to_cpu`` returns
    it) in place by one with attention ``types`` (block -> type). Returns the parameter names
    ``copied``, ``new`` (initialised with ``seed``) and ``dropped``."""
    args = copy.copy(state["cfg"]["model"])
    for block, (option, flag) in ATTENTION_BLOCKS.items():
        setattr(args, option, types[block])
        setattr(args, flag, False)  # the reference flags would override the types
    torch.manual_seed(seed)
    model = task.build_model(args)
    target = model.state_dict()
    source = state["model"]
    for name in sorted(set(target) & set(source)):
        if target[name].shape != source[name].shape:
            raise ValueError(f"{name}: shape {tuple(source[name].shape)} in the checkpoint, "
                             f"{tuple(target[name].shape)} in the converted model")
        target[name] = source[name]
    model.load_state_dict(target)
    state["model"] = model.state_dict()
    state["cfg"]["model"] = args
    state["args"] = None
    state["last_optimizer_state"] = None
    return {"copied": sorted(set(target) & set(source)),
            "new": sorted(set(target) - set(source)),
            "dropped": sorted(set(source) - set(target))}


def summary(names: Sequence[str]) -> str:
    """Parameter names grouped by their last three components: ``6 x leap_q.0.weight, ...``."""
    groups: Dict[str, int] = {}
    for name in names:
        key = ".".join(name.split(".")[-3:])
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"{count} x {key}" for key, count in sorted(groups.items())) or "none"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a checkpoint to other attention types "
                                                 "(see the module docstring).")
    parser.add_argument("--checkpoint", required=True, type=Path, help="a fairseq checkpoint "
                        "of one of our models")
    parser.add_argument("--attn-type", required=True, help="the new attention type of every "
                        "block (leap), or encoder-decoder-cross (softmax-softmax-leap)")
    parser.add_argument("--out", required=True, type=Path, help="the converted checkpoint")
    parser.add_argument("--seed", type=int, default=1, help="initialises the new parameters "
                        "(default 1)")
    parser.add_argument("--data", help="data directory of the task's dictionaries (default: "
                        "the checkpoint's)")
    args = parser.parse_args(argv)
    try:
        types = dict(zip(ATTENTION_BLOCKS, attention_types(args.attn_type)))
    except ConfigError as error:
        parser.error(str(error))
    if not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    from fairseq import checkpoint_utils, tasks

    state = checkpoint_utils.load_checkpoint_to_cpu(str(args.checkpoint))
    if args.data:
        state["cfg"]["task"]["data"] = args.data
    task = tasks.setup_task(state["cfg"]["task"])
    before = {block: getattr(state["cfg"]["model"], option)
              for block, (option, _) in ATTENTION_BLOCKS.items()}
    names = convert_state(state, task, types, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"{args.checkpoint} ({before}) -> {args.out} ({types})")
    print(f"copied {len(names['copied'])} tensors; new (seed {args.seed}): "
          f"{summary(names['new'])}; dropped: {summary(names['dropped'])}")


if __name__ == "__main__":
    main()
