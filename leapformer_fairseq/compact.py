"""A checkpoint to keep or hand on: a fairseq checkpoint without its optimizer state, the
weights in fp16 with ``--fp16``. It loads wherever the original does (``load_streaming_model``,
the SimulEval agents, ``fairseq-generate``), the weights cast back to the model's float32 on
loading; it cannot resume training.

    python -m leapformer_fairseq.compact --checkpoint RUN/checkpoint_last.pt --out model.pt --fp16
"""
import argparse
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch


def compact_state(state: Dict, fp16: bool) -> Dict:
    """``state`` (a fairseq checkpoint as ``torch.load`` returns it) without
    ``last_optimizer_state``; with ``fp16``, its floating-point weights in float16."""
    compact = {key: value for key, value in state.items() if key != "last_optimizer_state"}
    if fp16:
        compact["model"] = {name: tensor.half() if tensor.is_floating_point() else tensor
                            for name, tensor in state["model"].items()}
    return compact


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a fairseq checkpoint")
    parser.add_argument("--out", required=True, help="the compact checkpoint to write")
    parser.add_argument("--fp16", action="store_true", help="store the weights in float16")
    args = parser.parse_args(argv)
    source, out = Path(args.checkpoint), Path(args.out)
    if not source.is_file():
        raise SystemExit(f"[compact] --checkpoint {source}: no such file")
    state = torch.load(source, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state or "cfg" not in state:
        raise SystemExit(f"[compact] --checkpoint {source}: not a fairseq checkpoint "
                         "(no model and cfg)")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(compact_state(state, args.fp16), out)
    print(f"[compact] {source} ({source.stat().st_size / 2**20:.1f} MiB) -> {out} "
          f"({out.stat().st_size / 2**20:.1f} MiB{', fp16' if args.fp16 else ''})")


if __name__ == "__main__":
    main()
