"""What the attention blocks of a trained model actually do: LeaP proportions, re-weighting, clamp.

LeaP re-weights the linear score ``q~_i . k~_j`` by ``f_ij = cos(pi/2 (p_i - p'_j))``. A factor
that is nearly the same for every key of a query cancels in the normalisation, and LeaP is then
plain ReLU linear attention. This module measures, per attention block, on teacher-forced
batches:

- ``p_std_q``, ``p_std_k``: the spread (std) of the query and key proportions over tokens (LeaP:
  the MLPs' outputs; cosFormer: ``i / M``);
- ``factor_mean``: the mean of ``f_ij`` over attended pairs, and ``factor_spread``: per query,
  ``(max_j f_ij - min_j f_ij) / max_j f_ij`` over its attended keys, averaged over queries (0:
  the re-weighting cancels);
- ``clamp_rate``: the fraction of queries whose score sum is below the clamp ``eps``;
- ``entropy``: the entropy of each query's attention weights over its attended keys, divided by
  ``log`` of their number (1: uniform), averaged over queries with two or more keys; softmax
  blocks too, as the yardstick;
- ``dead_q``, ``dead_k``: the fraction of ReLU feature dimensions (per head) that are zero for
  every token seen.

The scores and masks are rebuilt from each block's own weights and its call's arguments
(:func:`attention_scores`), so what is measured is what the block computes; a test checks that
they reproduce the block's output.

    python -m leapformer_fairseq.diagnostics --checkpoint CKPT --data DATA_BIN --subset valid
"""
import argparse
import inspect
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor

from leapformer_fairseq import ops
from leapformer_fairseq.modules import LeaPMultiheadAttention

STATISTICS = ("p_std_q", "p_std_k", "factor_mean", "factor_spread", "clamp_rate", "entropy",
              "dead_q", "dead_k")


@dataclass
class AttentionScores:
    """One call of an attention block, rebuilt, ``N = B * heads`` rows.

    ``base``: ``(N, T, S)`` the linear score ``q~_i . k~_j`` (Hedgehog: ``phi(q_i) . phi(k_j)``;
    softmax: the logits ``q_i . k_j``);
    ``factor``: ``(N, T, S)`` ``cos(pi/2 (p_i - p'_j))``, or ``None`` (linear, softmax);
    ``allowed``: ``(N, T, S)`` bool, the attended pairs of real queries; ``q_proportion``,
    ``k_proportion``: ``(N, T)``, ``(N, S)`` or ``None``; ``q_features``, ``k_features``: the ReLU
    features ``(N, T, d)``, ``(N, S, d)`` (Hedgehog: its features ``(N, T, 2d)``; softmax:
    ``None``); ``query_real``: ``(N, T)`` bool;
    ``key_real``: ``(N, S)`` bool.
    """

    attn_type: str
    eps: float
    base: Tensor
    factor: Optional[Tensor]
    allowed: Tensor
    q_proportion: Optional[Tensor]
    k_proportion: Optional[Tensor]
    q_features: Optional[Tensor]
    k_features: Optional[Tensor]
    query_real: Tensor
    key_real: Tensor

    @property
    def scores(self) -> Tensor:
        """The block's scores ``s_ij`` on attended pairs, 0 elsewhere (softmax: the logits,
        ``-inf`` elsewhere)."""
        scores = self.base if self.factor is None else self.base * self.factor
        fill = float("-inf") if self.attn_type == "softmax" else 0.0
        return scores.masked_fill(~self.allowed, fill)

    def weights(self) -> Tensor:
        """Attention weights ``(N, T, S)``: ``s_ij / max(sum_j s_ij, eps)`` (linear types; rows
        under the clamp sum to less than 1), or the softmax; 0 for padded queries."""
        if self.attn_type == "softmax":
            weights = torch.softmax(self.scores, dim=-1)
        else:
            scores = self.scores
            weights = scores / scores.sum(-1, keepdim=True).clamp_min(self.eps)
        return weights.masked_fill(~self.query_real[..., None], 0.0).nan_to_num(0.0)


def _bind(module: LeaPMultiheadAttention, args, kwargs) -> Dict:
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


@torch.no_grad()
def attention_scores(module: LeaPMultiheadAttention, query: Tensor, key: Optional[Tensor],
                     key_padding_mask: Optional[Tensor] = None,
                     attn_mask: Optional[Tensor] = None,
                     key_limit: Optional[Tensor] = None) -> AttentionScores:
    """Rebuild the scores of one parallel call ``module(query, key, ...)`` (``(T, B, C)``,
    ``(S, B, C)``), in float64."""
    key = query if key is None else key
    heads = module.num_heads
    bsz, length, source_length = query.size(1), query.size(0), key.size(0)
    q = module._split_heads(module.q_proj(query) * module.scaling).double()
    k = module._split_heads(module.k_proj(key)).double()
    key_real = torch.ones(bsz, source_length, dtype=torch.bool, device=query.device)
    if key_padding_mask is not None:
        key_real = ~key_padding_mask
    query_real = key_real if module.self_attention else torch.ones(
        bsz, length, dtype=torch.bool, device=query.device)
    allowed = key_real[:, None, :].expand(bsz, length, source_length)
    if module.self_attention and (module.causal or attn_mask is not None):
        limit = module.unit_causal_limit(length, 0, query.device) if module.unit_causal \
            else torch.arange(1, length + 1, device=query.device)
        allowed = allowed & (torch.arange(source_length, device=query.device) < limit[:, None])
    if key_limit is None and module.waitk_lagging is not None:
        key_limit = module.waitk_key_limit(length, key_padding_mask, query.device)
    if key_limit is not None:
        limit = key_limit if key_limit.dim() == 2 else key_limit[None].expand(bsz, -1)
        allowed = allowed & (torch.arange(source_length, device=query.device) < limit[..., None])
    allowed = (allowed & query_real[..., None]).repeat_interleave(heads, 0)
    query_real, key_real = (x.repeat_interleave(heads, 0) for x in (query_real, key_real))
    q_proportion = k_proportion = factor = q_features = k_features = None
    if module.attn_type == "softmax":
        base = q @ k.transpose(1, 2)
    else:
        if module._hedgehog_features():  # Hedgehog, or LeaP re-weighting Hedgehog's features
            q_features, k_features = (
                ops.softmax_features(layer(x.to(query.dtype))).double()
                for x, layer in ((q, module.hedgehog_q), (k, module.hedgehog_k)))
        else:
            q_features, k_features = q.relu(), k.relu()
        base = q_features @ k_features.transpose(1, 2)
        if module.attn_type == "leap":
            q_proportion = module.leap_q(q.relu().to(query.dtype)).squeeze(-1).double()
            k_proportion = module.leap_k(k.relu().to(query.dtype)).squeeze(-1).double()
        elif module.attn_type == "cosformer":  # positions as the block counts them
            k_positions = module._positions(key_padding_mask, source_length, bsz, query.device)
            q_positions = k_positions if module.self_attention else module._positions(
                None, length, bsz, query.device)
            q_proportion, k_proportion = (
                module._per_head(positions).double() / module.cosformer_max_positions
                for positions in (q_positions, k_positions))
        if q_proportion is not None:
            factor = torch.cos((math.pi / 2) * (q_proportion[:, :, None]
                                                - k_proportion[:, None, :]))
    return AttentionScores(module.attn_type, module.eps, base, factor, allowed, q_proportion,
                           k_proportion, q_features, k_features, query_real, key_real)


class StatisticsSums:
    """Sums and counts of each statistic of one block over many calls."""

    def __init__(self):
        self.sums: Dict[str, float] = defaultdict(float)
        self.counts: Dict[str, float] = defaultdict(float)
        self.live_q: Optional[Tensor] = None  # (heads * d,) any token's feature > 0
        self.live_k: Optional[Tensor] = None
        self.attn_type = ""

    def add(self, name: str, values: Tensor) -> None:
        self.sums[name] += float(values.sum())
        self.counts[name] += values.numel()

    def add_call(self, scores: AttentionScores, heads: int) -> None:
        self.attn_type = scores.attn_type
        allowed = scores.allowed
        attended = allowed.sum(-1)  # (N, T)
        weights = scores.weights()
        several = scores.query_real & (attended > 1)
        entropy = -(weights * weights.clamp_min(1e-300).log()).sum(-1)
        self.add("entropy", entropy[several] / attended[several].double().log())
        if scores.attn_type == "softmax":
            return
        sums = scores.scores.sum(-1)
        self.add("clamp_rate", (sums[scores.query_real] < scores.eps).double())
        for side, features, real in (("q", scores.q_features, scores.query_real),
                                     ("k", scores.k_features, scores.key_real)):
            n, _, dim = features.shape
            live = ((features > 0) & real[..., None]).any(1)  # (N, d)
            live = live.reshape(n // heads, heads * dim).any(0)
            name = f"live_{side}"
            setattr(self, name, live if getattr(self, name) is None else getattr(self, name) | live)
        if scores.factor is None:
            return
        self.add("p_sq_q", scores.q_proportion[scores.query_real] ** 2)
        self.add("p_q", scores.q_proportion[scores.query_real])
        self.add("p_sq_k", scores.k_proportion[scores.key_real] ** 2)
        self.add("p_k", scores.k_proportion[scores.key_real])
        self.add("factor_mean", scores.factor[allowed])
        top = scores.factor.masked_fill(~allowed, -2.0).amax(-1)
        bottom = scores.factor.masked_fill(~allowed, 2.0).amin(-1)
        self.add("factor_spread", ((top - bottom) / top)[several])

    def result(self) -> Dict[str, Optional[float]]:
        def mean(name):
            return self.sums[name] / self.counts[name] if self.counts[name] else None

        out = {"attn_type": self.attn_type}
        for side in ("q", "k"):
            average = mean(f"p_{side}")
            out[f"p_std_{side}"] = None if average is None else math.sqrt(
                max(mean(f"p_sq_{side}") - average ** 2, 0.0))
            live = getattr(self, f"live_{side}")
            out[f"dead_{side}"] = None if live is None else 1.0 - float(live.double().mean())
        for name in ("factor_mean", "factor_spread", "clamp_rate", "entropy"):
            out[name] = mean(name)
        return out


@torch.no_grad()
def diagnose(model: torch.nn.Module, batches: Iterable[Dict]) -> Dict[str, Dict]:
    """Run ``model(**batch["net_input"])`` on each batch (eval mode) and measure every
    :class:`LeaPMultiheadAttention` in it: ``{module name: {statistic: value}}``."""
    sums: Dict[str, StatisticsSums] = {}
    handles = []

    def hook(name):
        def record(module, args, kwargs):
            call = _bind(module, args, kwargs)
            if call["incremental_state"] is not None:
                return
            scores = attention_scores(module, call["query"], call["key"],
                                      call["key_padding_mask"], call["attn_mask"],
                                      call["key_limit"])
            sums.setdefault(name, StatisticsSums()).add_call(scores, module.num_heads)
        return record

    for name, module in model.named_modules():
        if isinstance(module, LeaPMultiheadAttention):
            handles.append(module.register_forward_pre_hook(hook(name), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch["net_input"])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: stats.result() for name, stats in sums.items()}


def markdown_table(results: Dict[str, Dict]) -> str:
    def cell(value):
        return "-" if value is None else f"{value:.4f}"

    lines = ["| block | type | " + " | ".join(STATISTICS) + " |",
             "|---|---|" + "---|" * len(STATISTICS)]
    for name, row in results.items():
        lines.append(f"| {name} | {row['attn_type']} | "
                     + " | ".join(cell(row[s]) for s in STATISTICS) + " |")
    return "\n".join(lines) + "\n"


def checkpoint_batches(task, subset: str, max_sentences: int, max_tokens: int) -> List[Dict]:
    """The first ``max_sentences`` sentences of ``subset`` as fairseq batches."""
    task.load_dataset(subset)
    dataset = task.dataset(subset)
    indices = list(range(min(max_sentences, len(dataset))))
    iterator = task.get_batch_iterator(
        dataset, max_tokens=max_tokens, max_positions=None, ignore_invalid_inputs=True,
        required_batch_size_multiple=1).next_epoch_itr(shuffle=False)
    wanted = set(indices)
    batches = []
    for batch in iterator:
        keep = [i for i, index in enumerate(batch["id"].tolist()) if index in wanted]
        if keep:
            batches.append(batch if len(keep) == len(batch["id"]) else
                           dataset.collater([dataset[int(batch["id"][i])] for i in keep]))
    return batches


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Per-block attention diagnostics of a trained "
                                                 "checkpoint (see the module docstring).")
    parser.add_argument("--checkpoint", required=True, help="a fairseq checkpoint of ours")
    parser.add_argument("--data", help="data directory (default: the checkpoint's)")
    parser.add_argument("--subset", default="valid", help="split to run on (default valid)")
    parser.add_argument("--max-sentences", type=int, default=200,
                        help="first N sentences of the split (default 200)")
    parser.add_argument("--max-tokens", type=int, default=4000, help="tokens per batch")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    from fairseq import checkpoint_utils

    overrides = {"data": args.data} if args.data else {}
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [args.checkpoint], arg_overrides=overrides)
    results = diagnose(models[0], checkpoint_batches(task, args.subset, args.max_sentences,
                                                     args.max_tokens))
    print(markdown_table(results), end="")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
