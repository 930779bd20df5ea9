"""``LeaPMultiheadAttention``: a drop-in for fairseq's ``MultiheadAttention`` with LeaP attention.

The module subclasses fairseq's attention, so parameter names (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``), the call signature and ``incremental_state`` handling are fairseq's. ``softmax``
delegates to fairseq unchanged; the three linear types (``leap``, ``cosformer``, ``linear``) run
the forms in :mod:`leapformer_fairseq.ops` (causal self-attention builds no ``L x L`` matrix past
``short_form_max_length`` rows); so does ``hedgehog``, a learned softmax feature map (docs/math.md
§1) kept beside LeaP for comparison. LeaP re-weights ReLU features by default, or Hedgehog's
features (``leap_feature_map``). Which form runs for which call is chosen in one place,
:meth:`LeaPMultiheadAttention.select_form`, from the table ``FORMS``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, TypeVar

import torch
import torch.nn.functional as F
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

from leapformer_fairseq import ops

ATTN_TYPES = ("leap", "cosformer", "linear", "hedgehog", "softmax")
LINEAR_ATTN_TYPES = ("leap", "cosformer", "linear", "hedgehog")
LEAP_FEATURE_MAPS = ("relu", "hedgehog")

IncrementalState = Dict[str, Dict[str, Optional[Tensor]]]
Derived = TypeVar("Derived")


class StepParameters(NamedTuple):
    """The parameters the decode step reads: the fused ``(3 C, C)`` q/k/v projection
    (:meth:`LeaPMultiheadAttention._qkv_projection`), the feature maps' stacked parameters of
    both sides (``_side_parameters("qk")``) and ``out_proj``'s weight and bias."""

    qkv_weight: Tensor
    qkv_bias: Optional[Tensor]
    features: Dict[str, Tuple[Tensor, ...]]
    out_weight: Tensor
    out_bias: Optional[Tensor]

# Causal self-attention of at most this many rows takes the short form ("causal short"), per
# device type, from the cut-over sweep ``python benchmarks/attention.py --sections cutover``
# (docs/benchmarks.md). A device type not listed (CUDA: not measured yet) always takes
# "causal blockwise".
SHORT_FORM_MAX_LENGTH = {"cpu": 128}

# Rows per recomputed block of the causal blockwise form (``block_size``): each block costs a
# fixed amount of autograd bookkeeping besides its arithmetic, and working memory grows with the
# block; 512 measured about 10% faster than 256 at 8,192 tokens on the CPU, its peak memory
# still below fairseq softmax's there (docs/benchmarks.md).
BLOCK_SIZE = 512

# the attention types whose decode step and cross-attention read the compiled op serves
# (cosFormer's features read positions)
FUSED_STEP_TYPES = ("leap", "linear", "hedgehog")

# the incremental buffers of the linear types held per head, (B * H, ...): the recurrent state
PER_HEAD_BUFFERS = ("kv_state", "k_sum")

# the sides a feature map is computed for: queries (0), keys (1), or both stacked
SIDES = {"q": (0,), "k": (1,), "qk": (0, 1)}

# Every form a linear-attention call can take (:meth:`LeaPMultiheadAttention.select_form`) and the
# function of :mod:`leapformer_fairseq.ops` that computes it. The kernel forms run the causal sums
# of a backend other than ``torch`` (``ops.select_backend``); ``step fused`` and ``read fused``
# run where the step backend is ``cpp`` (``ops.select_step_backend``).
FORMS = {
    "bidirectional": "bidirectional_linear_attention",
    "prefix": "prefix_linear_attention",
    "prefix kernel": "prefix_linear_attention_with the backend's sums (merged sequence)",
    "causal short": "causal_linear_attention, one chunk (masked L x L scores)",
    "causal blockwise": "blockwise_causal_linear_attention",
    "causal kernel": "causal_linear_attention_with the backend's sums",
    "step": "recurrent_step, one fused projection of q, k and v (_token_step)",
    "step fused": "fused_recurrent_step, the compiled CPU op: features, LeaP MLPs, state update "
                  "and read in one call (_token_step)",
    "step chunked": "causal_linear_attention from the state",
    "step units": "update_state, then query_state, per unit",
    "read": "query_state of the source sums",
    "read fused": "fused_query_state, the compiled CPU op: the query's features and the read "
                  "of the source sums in one call",
}


def leap_proportion_mlp(head_dim: int, leap_factor: int,
                        input_norm: bool = False) -> nn.Sequential:
    """``LeaP(u) = sigmoid(W2 relu(W1 u + b1) + b2)``, ``W1: d -> d / leap_factor``,
    ``W2: -> 1``; with ``input_norm``, ``u`` is layer-normalised first (``LayerNorm(d)``)."""
    hidden = max(1, head_dim // leap_factor)
    layers = [nn.Linear(head_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid()]
    return nn.Sequential(*([nn.LayerNorm(head_dim)] if input_norm else []), *layers)


def hedgehog_map(head_dim: int, gain: float) -> nn.Linear:
    """Hedgehog's learned map ``W u + b`` before the softmax features, initialised to
    ``gain * identity`` and zero bias."""
    layer = nn.Linear(head_dim, head_dim)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(head_dim) * gain)
        layer.bias.zero_()
    return layer


class LeaPMultiheadAttention(MultiheadAttention):
    """Multi-head attention whose scores are LeaP, cosFormer, plain linear, Hedgehog or softmax.

    Args (beyond fairseq's ``embed_dim``, ``num_heads``, ``kdim``, ``vdim``, ``dropout``, ``bias``,
    ``self_attention``, ``encoder_decoder_attention``), first what is computed:
        attn_type: one of ``leap``, ``cosformer``, ``linear``, ``hedgehog``, ``softmax``.
        leap_factor: LeaP MLP hidden size is ``head_dim // leap_factor``.
        leap_input_norm: layer-normalise the LeaP MLPs' input.
        leap_feature_map: (``leap`` only; other types ignore it) the features LeaP re-weights:
            ``relu`` (``relu(u)``, width d) or ``hedgehog`` (Hedgehog's learned softmax
            features, width 2d, so the re-weighted features and the recurrent state are 4d
            wide); the MLPs read ``relu(u)`` either way.
        eps: the denominator clamp ``max(sum_j s_ij, eps)`` of the linear types.
        causal: self-attention where token i sees tokens ``j <= i``. fairseq's future mask passed
            as ``attn_mask`` selects the same thing.
        cosformer_max_positions: the fixed ``M`` of cosFormer's ``p_i = i / M``.
        frames_per_unit: keys (encoder frames) per source unit: the step of the wait-k schedule
            and the unit of ``unit_causal``; 1 for text.
        waitk_lagging: wait-k cross-attention: in parallel (training) calls target token i sees
            the first ``i + k`` source units (see :meth:`waitk_key_limit`). Incremental calls
            see exactly the source pushed so far.
        unit_causal: with ``causal``, position t sees every position of its own unit of
            ``frames_per_unit`` positions and of the units before. Incremental steps then take
            whole units (the last may be partial).

    then how it is tiled (results do not depend on these):
        chunk_size: chunk length of the causal chunked form.
        block_size: rows per block of causal self-attention, whose features are recomputed
            block by block in backward (memory ``O(L d)`` plus ``O(block_size)``).
        short_form_max_length: causal self-attention of at most this many rows takes the short
            form (one masked ``L x L`` chunk, no recomputation); ``None``: the measured cut-over
            of the input's device (``SHORT_FORM_MAX_LENGTH``).
        compile_feature_map: in training mode, the parallel forms compute the feature map
            (:meth:`_features`) through ``torch.compile`` (``COMPILED_FEATURES``), compiled on
            the first training pass; evaluation and incremental calls stay eager.

    For the linear types, ``dropout`` is applied to the values (attention weights are never
    formed), so evaluation-mode outputs are deterministic; ``need_weights`` returns ``None``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        dropout: float = 0.0,
        bias: bool = True,
        self_attention: bool = False,
        encoder_decoder_attention: bool = False,
        attn_type: str = "leap",
        leap_factor: int = 4,
        leap_input_norm: bool = False,
        leap_feature_map: str = "relu",
        eps: float = 0.1,
        causal: bool = False,
        cosformer_max_positions: int = 1024,
        frames_per_unit: int = 1,
        waitk_lagging: Optional[int] = None,
        unit_causal: bool = False,
        chunk_size: int = 32,
        block_size: int = BLOCK_SIZE,
        short_form_max_length: Optional[int] = None,
        compile_feature_map: bool = False,
        **fairseq_kwargs,
    ):
        if attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}")
        if attn_type in LINEAR_ATTN_TYPES:
            unsupported = [
                name
                for name in ("add_bias_kv", "add_zero_attn", "xformers_att_config")
                if fairseq_kwargs.get(name)
            ]
            if unsupported:
                raise ValueError(f"attn_type={attn_type!r} does not support {unsupported}")
        if leap_feature_map not in LEAP_FEATURE_MAPS:
            raise ValueError(f"leap_feature_map must be one of {LEAP_FEATURE_MAPS}, "
                             f"got {leap_feature_map!r}")
        if leap_factor < 1:
            raise ValueError(f"leap_factor must be >= 1, got {leap_factor}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if causal and not self_attention:
            raise ValueError("causal=True needs self_attention=True")
        if waitk_lagging is not None and (not encoder_decoder_attention or waitk_lagging < 1):
            raise ValueError("waitk_lagging must be >= 1 and needs encoder_decoder_attention=True, "
                             f"got {waitk_lagging}")
        if frames_per_unit < 1:
            raise ValueError(f"frames_per_unit must be >= 1, got {frames_per_unit}")
        if unit_causal and not causal:
            raise ValueError("unit_causal=True needs causal=True")
        if short_form_max_length is not None and short_form_max_length < 0:
            raise ValueError(f"short_form_max_length must be >= 0, got {short_form_max_length}")
        super().__init__(
            embed_dim,
            num_heads,
            kdim=kdim,
            vdim=vdim,
            dropout=dropout,
            bias=bias,
            self_attention=self_attention,
            encoder_decoder_attention=encoder_decoder_attention,
            **fairseq_kwargs,
        )
        self.attn_type = attn_type
        self.leap_factor = leap_factor
        self.leap_input_norm = leap_input_norm
        self.leap_feature_map = leap_feature_map
        self.eps = eps
        self.causal = causal
        self.cosformer_max_positions = cosformer_max_positions
        self.frames_per_unit = frames_per_unit
        self.waitk_lagging = waitk_lagging
        self.unit_causal = unit_causal
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.short_form_max_length = short_form_max_length
        self.compile_feature_map = compile_feature_map
        self._counts_positions = attn_type == "cosformer" or unit_causal
        self._hedgehog = attn_type == "hedgehog" or (
            attn_type == "leap" and leap_feature_map == "hedgehog")
        # what _derive keeps: name -> (source parameters, their versions, value)
        self._derived: Dict[str, Tuple[Tuple[Tensor, ...], List[int], object]] = {}
        if attn_type == "leap":
            self.leap_q = leap_proportion_mlp(self.head_dim, leap_factor, leap_input_norm)
            self.leap_k = leap_proportion_mlp(self.head_dim, leap_factor, leap_input_norm)
        if self._hedgehog:  # the query map first undoes fairseq's query scaling
            self.hedgehog_q = hedgehog_map(self.head_dim, 1.0 / self.scaling)
            self.hedgehog_k = hedgehog_map(self.head_dim, 1.0)

    def extra_repr(self) -> str:
        feature_map = f", leap_feature_map={self.leap_feature_map}" \
            if self.attn_type == "leap" else ""
        return (f"attn_type={self.attn_type}{feature_map}, causal={self.causal}, eps={self.eps}, "
                f"frames_per_unit={self.frames_per_unit}, waitk_lagging={self.waitk_lagging}, "
                f"unit_causal={self.unit_causal}")

    def waitk_key_limit(
        self, target_length: int, key_padding_mask: Optional[Tensor], device: torch.device
    ) -> Tensor:
        """Wait-k (docs/math.md §4): target token i sees source units ``0 .. i + k - 1``, i.e. the
        first ``(i + k) * frames_per_unit`` keys.

        Returns ``(T,)``, or ``(B, T)`` shifted by each sentence's left padding.
        """
        units = torch.arange(target_length, device=device) + self.waitk_lagging
        limit = units * self.frames_per_unit
        if key_padding_mask is None:
            return limit
        left_padding = (~key_padding_mask).long().cumsum(dim=1).eq(0).sum(dim=1)
        return left_padding[:, None] + limit[None, :]

    def unit_causal_limit(self, length: int, start: int, device: torch.device) -> Tensor:
        """Unit-causal self-attention: position ``start + t`` sees keys up to the end of its unit,
        ``0 .. (floor((start + t) / frames_per_unit) + 1) * frames_per_unit - 1`` (absolute
        indices), ``(length,)``."""
        position = torch.arange(start, start + length, device=device)
        return torch.div(position, self.frames_per_unit, rounding_mode="floor").add(1).mul(
            self.frames_per_unit)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[IncrementalState] = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Optional[Tensor] = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
        key_limit: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """fairseq's signature; tensors are ``T x B x C``.

        Args:
            key_padding_mask: ``(B, S)`` bool, True at padding.
            incremental_state: recurrent state per layer (linear types) or fairseq's key/value
                cache (softmax). For cross-attention with ``static_kv`` the source sums are
                cached once; with ``static_kv=False`` the given keys are appended to them
                (a growing, streamed source).
            attn_mask: fairseq's future mask; the linear types accept only that mask.
            key_limit: ``(T,)`` or ``(B, T)``: query i sees the first ``key_limit[i]`` keys
                (wait-k cross-attention, unit-causal self-attention).
        Returns:
            ``(T, B, C)`` output and the attention weights (``None`` for the linear types).
        """
        if self.waitk_lagging is not None and key_limit is None and incremental_state is None:
            key_limit = self.waitk_key_limit(query.size(0), key_padding_mask, query.device)
        if self.attn_type == "softmax":
            return self._softmax_forward(
                query, key, value, key_padding_mask, incremental_state, need_weights,
                static_kv, attn_mask, before_softmax, need_head_weights, key_limit,
            )
        if before_softmax:
            raise ValueError(f"before_softmax has no meaning for attn_type={self.attn_type!r}")
        causal = self.causal
        if attn_mask is not None:
            if not (self.self_attention and self._is_future_mask(attn_mask, query.size(0))):
                raise ValueError(
                    f"attn_type={self.attn_type!r} accepts only fairseq's future mask as "
                    "attn_mask; use key_limit for prefix-limited attention"
                )
            causal = True
        incremental = incremental_state is not None
        if incremental and key_limit is not None:
            raise ValueError("key_limit is a training-time mask; incremental steps "
                             "see exactly the keys pushed so far")
        if self.self_attention and causal and self.unit_causal and not incremental:
            causal, key_limit = False, self.unit_causal_limit(query.size(0), 0, query.device)
        select_backend = ops.select_step_backend if incremental else ops.select_backend
        backend = select_backend(query.device, query.dtype)
        form = self.select_form(query.size(0), incremental, causal, key_limit is not None,
                                key_padding_mask is not None, query.device, backend)
        if form in ("step", "step fused"):
            return self._token_step(form, query, incremental_state), None
        if form in ("read", "read fused"):
            out = self._cross_attention_step(
                form, query, key, value, key_padding_mask, incremental_state, static_kv)
        elif form.startswith("step"):
            out = self._self_attention_step(form, query, key_padding_mask, incremental_state)
        elif self.self_attention:
            out = self._self_attention(form, query, key_padding_mask, key_limit, backend)
        else:
            out = self._cross_attention(form, query, key, value, key_padding_mask, key_limit,
                                        backend)
        return self._merge_heads(out, query.size(1)), None

    def select_form(self, length: int, incremental: bool, causal: bool, key_limit: bool,
                    padded: bool, device: torch.device, backend: str = "torch") -> str:
        """The form (a key of ``FORMS``) a linear-attention call takes: the one place that
        chooses.

        Args:
            length: query rows of the call; incremental: an ``incremental_state`` is passed;
            causal: causal self-attention (unit-causal calls arrive as ``key_limit``);
            key_limit: the call limits each query's keys (wait-k, unit-causal);
            padded: a key padding mask is passed; device: the inputs' device;
            backend: parallel calls: of the causal sums (``ops.BACKENDS``; ``torch``: the
                native forms); incremental calls: of the decode step (``torch`` or ``cpp``,
                ``ops.select_step_backend``).
        """
        kernel = backend != "torch"
        if incremental:
            fusable = self.attn_type in FUSED_STEP_TYPES and backend == "cpp"
            if not self.self_attention:
                return "read fused" if fusable and length == 1 else "read"
            if self.unit_causal:
                return "step units"
            if length > 1 or padded:
                return "step chunked"
            return "step fused" if fusable and not self._dropout_active() else "step"
        if key_limit:
            return "prefix kernel" if kernel else "prefix"
        if not (self.self_attention and causal):
            return "bidirectional"
        if kernel:
            return "causal kernel"
        short = self.short_form_max_length
        if short is None:
            short = SHORT_FORM_MAX_LENGTH.get(torch.device(device).type, 0)
        return "causal short" if length <= short else "causal blockwise"

    # --------------------------------------------------------------- parallel forms
    def _self_attention(
        self, form: str, x: Tensor, padding_mask: Optional[Tensor], key_limit: Optional[Tensor],
        backend: str,
    ) -> Tensor:
        """The parallel forms of self-attention: ``bidirectional``, ``prefix`` (``prefix
        kernel``), ``causal short``, ``causal blockwise``, ``causal kernel``."""
        positions = self._positions(padding_mask, x.size(0), x.size(1), x.device)
        mask = self._per_head(padding_mask)
        if form == "causal blockwise":
            out = self._blockwise_causal(x, positions, mask)
            return out if mask is None else out.masked_fill(mask[..., None], 0.0)
        qkv = self._self_projections(x, *self._qkv_projection())
        q, k = self._parallel_features(qkv[:2], "qk", positions)
        v = self.dropout_module(qkv[2])
        if form in ("causal short", "causal kernel"):
            if form == "causal short":
                out, _ = ops.causal_linear_attention(q, k, v, x.size(0), mask, self.eps,
                                                     output_final_state=False)
            else:
                out, _ = ops.causal_linear_attention_with(ops.SUMS[backend], q, k, v, mask,
                                                          self.eps)
            return out if mask is None else out.masked_fill(mask[..., None], 0.0)
        if form.startswith("prefix"):
            return self._prefix(form, backend, q, k, v, key_limit, mask, mask)
        return ops.bidirectional_linear_attention(q, k, v, mask, mask, self.eps)

    def _prefix(self, form: str, backend: str, q: Tensor, k: Tensor, v: Tensor,
                key_limit: Tensor, key_mask: Optional[Tensor],
                query_mask: Optional[Tensor]) -> Tensor:
        """``prefix`` or ``prefix kernel`` on features and per-head masks."""
        limit = self._per_head(key_limit)
        if form == "prefix kernel":
            return ops.prefix_linear_attention_with(ops.SUMS[backend], q, k, v, limit, key_mask,
                                                    query_mask, self.eps)
        return ops.prefix_linear_attention(q, k, v, limit, key_mask, query_mask, self.eps)

    def _self_projections(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """Self-attention's input ``x`` ``(L, B, C)`` through the fused projection ``weight``,
        ``bias`` of :meth:`_qkv_projection` (``S = 3`` or ``2`` sides): ``(S, B * H, L, d)``,
        queries (times fairseq's scaling), keys and values, a view with rows outermost in
        memory (as fairseq's heads are)."""
        length, bsz, _ = x.shape
        qkv = F.linear(x, weight, bias).view(length, bsz * self.num_heads, -1, self.head_dim)
        return qkv.permute(2, 1, 0, 3)

    def _blockwise_causal(
        self, x: Tensor, positions: Optional[Tensor], mask: Optional[Tensor]
    ) -> Tensor:
        """Causal self-attention that stores no projection or feature: projections and
        features are recomputed block by block in backward. Values are stored only while
        dropout is active (a recomputed dropout mask would differ)."""
        dropout_active = self._dropout_active()
        values = None
        if dropout_active:  # q and k only from the fused projection
            values = self.dropout_module(self._split_heads(self.v_proj(x)))
        weight, bias = self._qkv_projection(2 if dropout_active else 3)
        parameters = self._side_parameters("qk")

        def feature_map(
            x_block: Tensor, rows: slice
        ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
            x_block = x_block.transpose(0, 1)
            block_positions = None if positions is None else positions[:, rows]
            qkv = self._self_projections(x_block, weight, bias)
            q, k = self._parallel_features(qkv[:2], "qk", block_positions, parameters)
            return q, k, None if dropout_active else qkv[2]

        # the fused and stacked weights, built once, are what the blocks read: their gradients
        # flow on to the modules' parameters through _qkv_projection and _side_parameters
        feature_params = [weight, *([] if bias is None else [bias])]
        feature_params += [tensor for pair in parameters.values() for tensor in pair]
        return ops.blockwise_causal_linear_attention(
            x.transpose(0, 1), feature_map, feature_params, values, self.chunk_size,
            self.block_size, mask, self.eps,
        )

    def _cross_attention(
        self,
        form: str,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        key_limit: Optional[Tensor],
        backend: str,
    ) -> Tensor:
        """The parallel forms of cross-attention: ``bidirectional``, ``prefix`` (``prefix
        kernel``)."""
        bsz = query.size(1)
        q_positions = self._positions(None, query.size(0), bsz, query.device)
        k_positions = self._positions(key_padding_mask, key.size(0), bsz, key.device)
        q = self._parallel_features(
            self._split_heads(F.linear(query, *self._qkv_projection(1))), "q", q_positions)
        k = self._parallel_features(self._split_heads(self.k_proj(key)), "k", k_positions)
        v = self.dropout_module(self._split_heads(self.v_proj(value)))
        mask = self._per_head(key_padding_mask)
        if form != "bidirectional":
            return self._prefix(form, backend, q, k, v, key_limit, mask, None)
        return ops.bidirectional_linear_attention(q, k, v, mask, None, self.eps)

    # ------------------------------------------------------------ incremental forms
    def _self_attention_step(
        self, form: str, x: Tensor, padding_mask: Optional[Tensor],
        incremental_state: IncrementalState,
    ) -> Tensor:
        """Advance the causal recurrent state by ``T >= 1`` new tokens; no key/value cache.
        ``step units``: the tokens are whole units, each read after its own keys are added;
        ``step chunked``: any tokens, padded or not."""
        buffer = self._get_input_buffer(incremental_state)
        state, position = self._load_state(buffer, x.size(1), "position", x)
        positions = self._positions(padding_mask, x.size(0), x.size(1), x.device, position)
        qkv = self._self_projections(x, *self._qkv_projection())
        q, k = self._features(qkv[:2], "qk", positions)
        v = self.dropout_module(qkv[2])
        mask = self._per_head(padding_mask)
        if form == "step units":
            if mask is not None or bool((position % self.frames_per_unit).any()):
                raise ValueError("unit-causal steps take unpadded whole units, starting at a "
                                 "unit boundary")
            outputs = []
            for start in range(0, x.size(0), self.frames_per_unit):
                rows = slice(start, start + self.frames_per_unit)
                state = ops.update_state(state, k[:, rows], v[:, rows])
                outputs.append(ops.query_state(state, q[:, rows], self.eps))
            out = torch.cat(outputs, dim=1)
        else:
            out, state = ops.causal_linear_attention(
                q, k, v, self.chunk_size, mask, self.eps, initial_state=state
            )
        if position is not None:
            position = position + self._count_tokens(x, padding_mask)
        self._store_state(buffer, state, position, "position")
        self._set_input_buffer(incremental_state, buffer)
        return out

    def _token_step(self, form: str, x: Tensor, incremental_state: IncrementalState) -> Tensor:
        """The ``step`` and ``step fused`` forms: one unpadded token ``(1, B, C)`` through the
        recurrent state, as few ops as the math allows (the decode loop): q, k and v from one
        fused projection, then both sides' features in one pass, one rank-1 state update and
        read (``step``), or all of that in one compiled op (``step fused``); returns the output
        after ``out_proj``, ``(1, B, C)``."""
        buffer = self._get_input_buffer(incremental_state)
        bsz = x.size(1)
        state, position = self._load_state(buffer, bsz, "position", x)
        positions = self._positions(None, 1, bsz, x.device, position)
        step = self._step_parameters()
        qkv = self._self_projections(x, step.qkv_weight, step.qkv_bias)
        if form == "step fused":
            state, out = ops.fused_recurrent_step(state, qkv[:2, :, 0], qkv[2, :, 0],
                                                  step.features, self.eps, self._norm_eps())
        else:
            q, k = self._features(qkv[:2], "qk", positions, step.features).unbind(0)
            v = self.dropout_module(qkv[2]) if self._dropout_active() else qkv[2]
            state, out = ops.recurrent_step(state, q, k, v, self.eps)
        self._store_state(buffer, state, None if position is None else position + 1, "position")
        self._set_input_buffer(incremental_state, buffer)
        # (B * H, 1, d) holds the same numbers as (1, B, C): no transpose
        return F.linear(out.view(1, bsz, self.embed_dim), step.out_weight, step.out_bias)

    def _cross_attention_step(
        self,
        form: str,
        query: Tensor,
        key: Optional[Tensor],
        value: Optional[Tensor],
        key_padding_mask: Optional[Tensor],
        incremental_state: IncrementalState,
        static_kv: bool,
    ) -> Tensor:
        """Read the source sums with new target queries (``read``; ``read fused``: one query,
        its features and the read in one compiled op).

        With ``static_kv`` the sums over ``key`` are computed once and cached; otherwise ``key``
        holds new source units that extend the cached sums (``None`` adds nothing).
        """
        bsz = query.size(1)
        source_cached = "kv_state" in self._get_input_buffer(incremental_state)
        if key is not None and not (static_kv and source_cached):
            self.extend_source(incremental_state, key, value, key_padding_mask)
        buffer = self._get_input_buffer(incremental_state)
        state, _ = self._load_state(buffer, bsz, "key_position", query)
        query_position = self._position(buffer, "query_position", bsz, query.device)
        q_positions = self._positions(None, query.size(0), bsz, query.device, query_position)
        u = self._split_heads(F.linear(query, *self._qkv_projection(1)))
        if query_position is not None:
            buffer["query_position"] = query_position + query.size(0)
        self._set_input_buffer(incremental_state, buffer)
        if form == "read fused":
            return ops.fused_query_state(state, u[:, 0], self._side_parameters("q"), self.eps,
                                         self._norm_eps()).unsqueeze(1)
        return ops.query_state(state, self._features(u, "q", q_positions), self.eps)

    def extend_source(
        self,
        incremental_state: IncrementalState,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
    ) -> None:
        """Append new source units ``(S_new, B, C)`` to the cached cross-attention state.

        Linear types add them to the sums ``(S, z)`` (O(S_new) work); softmax appends their
        keys and values to fairseq's cache. Later incremental calls with ``static_kv=True``
        read what has been appended.
        """
        if not self.encoder_decoder_attention:
            raise ValueError("extend_source is for encoder-decoder attention")
        bsz = key.size(1)
        buffer = self._get_input_buffer(incremental_state)
        if self.attn_type == "softmax":
            self._extend_softmax_cache(buffer, key, value, key_padding_mask)
        else:
            state, key_position = self._load_state(buffer, bsz, "key_position", key)
            k_positions = self._positions(
                key_padding_mask, key.size(0), bsz, key.device, key_position
            )
            k = self._features(self._split_heads(self.k_proj(key)), "k", k_positions)
            v = self._split_heads(self.v_proj(value))
            state = ops.update_state(state, k, v, self._per_head(key_padding_mask))
            if key_position is not None:
                key_position = key_position + self._count_tokens(key, key_padding_mask)
            self._store_state(buffer, state, key_position, "key_position")
        self._set_input_buffer(incremental_state, buffer)

    def _extend_softmax_cache(
        self,
        buffer: Dict[str, Optional[Tensor]],
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
    ) -> None:
        """Append to fairseq's ``prev_key``/``prev_value`` ``(B, H, S, d)`` and padding mask."""
        bsz = key.size(1)
        shape = (bsz, self.num_heads, key.size(0), self.head_dim)
        k = self._split_heads(self.k_proj(key)).reshape(shape)
        v = self._split_heads(self.v_proj(value)).reshape(shape)
        if key_padding_mask is None:
            key_padding_mask = torch.zeros(bsz, key.size(0), dtype=torch.bool, device=key.device)
        if "prev_key" in buffer:
            k = torch.cat([buffer["prev_key"], k], dim=2)
            v = torch.cat([buffer["prev_value"], v], dim=2)
            key_padding_mask = torch.cat([buffer["prev_key_padding_mask"], key_padding_mask], 1)
        buffer["prev_key"], buffer["prev_value"] = k, v
        buffer["prev_key_padding_mask"] = key_padding_mask

    def reorder_incremental_state(
        self, incremental_state: Optional[IncrementalState], new_order: Tensor
    ) -> Optional[IncrementalState]:
        """Beam search: reorder every buffered tensor (batch-first: ``(B, ...)``, or
        ``(B * H, ...)`` for ``PER_HEAD_BUFFERS``)."""
        if self.attn_type == "softmax":
            return super().reorder_incremental_state(incremental_state, new_order)
        buffer = self._get_input_buffer(incremental_state)
        if buffer:
            for name, tensor in buffer.items():
                if tensor is None:
                    continue
                if name in PER_HEAD_BUFFERS:
                    tensor = tensor.unflatten(0, (-1, self.num_heads)).index_select(
                        0, new_order).flatten(0, 1)
                else:
                    tensor = tensor.index_select(0, new_order)
                buffer[name] = tensor
            incremental_state = self._set_input_buffer(incremental_state, buffer)
        return incremental_state

    # ------------------------------------------------------------------- helpers
    def _split_heads(self, x: Tensor) -> Tensor:
        """``(L, B, C) -> (B * H, L, head_dim)``."""
        length, bsz, _ = x.shape
        return x.reshape(length, bsz * self.num_heads, self.head_dim).transpose(0, 1)

    def _merge_heads(self, x: Tensor, bsz: int) -> Tensor:
        """``(B * H, L, head_dim) -> (L, B, C)``, then the output projection."""
        length = x.size(1)
        x = x.transpose(0, 1).reshape(length, bsz, self.embed_dim)
        return self.out_proj(x)

    def _per_head(self, x: Optional[Tensor]) -> Optional[Tensor]:
        """Repeat a per-sentence ``(B, ...)`` tensor for every head: ``(B * H, ...)``.

        A ``(T,)`` key limit shared by the batch passes through unchanged.
        """
        if x is None or x.dim() == 1:
            return x
        return x.repeat_interleave(self.num_heads, dim=0)

    @staticmethod
    def _count_tokens(x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """Non-pad tokens per sentence in a ``(L, B, C)`` block: ``(B,)`` float."""
        if padding_mask is None:
            return torch.full((x.size(1),), float(x.size(0)), device=x.device)
        return (~padding_mask).sum(dim=1).to(torch.float32)

    def _positions(
        self,
        padding_mask: Optional[Tensor],
        length: int,
        bsz: int,
        device: torch.device,
        start: Optional[Tensor] = None,
    ) -> Optional[Tensor]:
        """Token positions ``(B, L)`` for cosFormer (``None`` for the other types).

        Raises ``ValueError`` for a position ``>= cosformer_max_positions`` (docs/math.md §1:
        ``p = i / M`` would leave ``[0, 1)``).
        """
        if self.attn_type != "cosformer":
            return None
        if padding_mask is None:
            padding_mask = torch.zeros(bsz, length, dtype=torch.bool, device=device)
        positions = ops.positions_from_padding(padding_mask, 0 if start is None else start)
        # positions of a parallel call are < length: only incremental calls and sequences of M
        # or more rows need the exact maximum (a device sync on GPU)
        may_pass = start is not None or length > self.cosformer_max_positions
        if may_pass and positions.numel() and \
                int(positions.max()) >= self.cosformer_max_positions:
            raise ValueError(
                f"cosFormer position {int(positions.max())} is past --cosformer-max-positions "
                f"{self.cosformer_max_positions} (p = i / M must stay in [0, 1))")
        return positions

    def _norm_eps(self) -> float:
        """The epsilon of the LeaP MLPs' input norm (0 without one)."""
        return self.leap_q[0].eps if self.leap_input_norm else 0.0

    def _dropout_active(self) -> bool:
        """Whether ``dropout_module`` changes its input (the values) now."""
        dropout = self.dropout_module
        return (self.training or dropout.apply_during_inference) and dropout.p > 0

    def _hedgehog_features(self) -> bool:
        """Whether the features are Hedgehog's (``hedgehog``, or ``leap`` re-weighting them)."""
        return self._hedgehog

    def _feature_layers(self) -> Dict[str, Tuple[nn.Module, nn.Module]]:
        """The learned layers of the feature map by role, each as (query side, key side):
        ``hedgehog`` (Hedgehog's map), then the LeaP MLPs' ``norm`` (with ``leap_input_norm``),
        ``hidden`` and ``out`` layers."""
        layers: Dict[str, Tuple[nn.Module, nn.Module]] = {}
        if self._hedgehog:
            layers["hedgehog"] = (self.hedgehog_q, self.hedgehog_k)
        if self.attn_type == "leap":
            first = 1 if self.leap_input_norm else 0
            if self.leap_input_norm:
                layers["norm"] = (self.leap_q[0], self.leap_k[0])
            layers["hidden"] = (self.leap_q[first], self.leap_k[first])
            layers["out"] = (self.leap_q[first + 2], self.leap_k[first + 2])
        return layers

    def _feature_map_modules(self) -> Tuple[nn.Module, ...]:
        """The learned parts of the feature map (query side, key side, ...), if any."""
        return tuple(layer for pair in self._feature_layers().values() for layer in pair)

    def _derive(self, name: str, modules: Callable[[], Tuple[nn.Module, ...]],
                build: Callable[[], Derived]) -> Derived:
        """``build()``, a function of the parameters of ``modules()``. Without autograd
        (inference) the result is kept and reused until one of them changes in place (its
        version counter), is loaded (``_load_from_state_dict``), moved or cast (``_apply``), or
        the module switches between train and eval (``train``)."""
        if torch.is_grad_enabled():
            return build()
        kept = self._derived.get(name)
        if kept is None:
            sources = tuple(p for module in modules() for p in module.parameters())
        else:
            sources = kept[0]
        versions = [parameter._version for parameter in sources]
        if kept is None or kept[1] != versions:
            kept = self._derived[name] = (sources, versions, build())
        return kept[2]

    def _apply(self, fn, *args, **kwargs):
        self._derived.clear()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._derived.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def train(self, mode: bool = True):
        self._derived.clear()
        return super().train(mode)

    def _qkv_projection(self, sides: int = 3) -> Tuple[Tensor, Optional[Tensor]]:
        """``q_proj`` (times fairseq's query scaling), then ``k_proj`` and ``v_proj`` up to
        ``sides`` (1: the scaled query projection alone, cross-attention's) as one ``(S C, C)``
        weight and ``(S C,)`` bias (``None`` without biases), rows head by head: the output
        viewed ``(..., H, S, d)`` (:meth:`_self_projections`)."""
        def projections() -> Tuple[nn.Module, ...]:
            return (self.q_proj, self.k_proj, self.v_proj)[:sides]

        def interleave(tensors: List[Tensor]) -> Tensor:
            """``S`` tensors ``(C, ...)`` -> rows ``(H, S, d)``, the query's scaled."""
            stacked = torch.stack([tensors[0] * self.scaling, *tensors[1:]])
            per_head = stacked.view(sides, self.num_heads, self.head_dim, *stacked.shape[2:])
            return per_head.transpose(0, 1).reshape(-1, *stacked.shape[2:])

        def build() -> Tuple[Tensor, Optional[Tensor]]:
            weight = interleave([projection.weight for projection in projections()])
            if self.q_proj.bias is None:
                return weight, None
            return weight, interleave([projection.bias for projection in projections()])
        return self._derive("qkv"[:sides], projections, build)

    def _step_parameters(self) -> StepParameters:
        """What the ``step`` form reads of the parameters, kept as one derived value (one
        look-up per token instead of one per part)."""
        def build() -> StepParameters:
            return StepParameters(*self._qkv_projection(), self._side_parameters("qk"),
                                  self.out_proj.weight, self.out_proj.bias)
        return self._derive("step", lambda: (self.q_proj, self.k_proj, self.v_proj,
                                             self.out_proj, *self._feature_map_modules()), build)

    def _side_parameters(self, side: str) -> Dict[str, Tuple[Tensor, ...]]:
        """Each feature-map layer's parameters stacked over the sides of ``side`` (a key of
        ``SIDES``), shaped for rows ``(S, M, d)``: linear layers as ``(S, d_in, d_out)``
        transposed weights and ``(S, 1, d_out)`` biases (``ops.stacked_linear``), the layer
        norm as ``(S, 1, d)`` weight and bias."""
        def build() -> Dict[str, Tuple[Tensor, ...]]:
            stacked = {}
            for role, pair in self._feature_layers().items():
                weight, bias = (torch.stack([getattr(pair[i], name) for i in SIDES[side]])
                                for name in ("weight", "bias"))
                weight = weight.unsqueeze(1) if role == "norm" else weight.transpose(1, 2)
                stacked[role] = (weight, bias.unsqueeze(1))
            return stacked
        return self._derive("features " + side, self._feature_map_modules, build)

    def _features(self, u: Tensor, side: str, positions: Optional[Tensor],
                  parameters: Optional[Dict[str, Tuple[Tensor, ...]]] = None) -> Tensor:
        """Projections -> features ``phi``, ``F`` wide (:meth:`_feature_dim`): ``(N, L, d) ->
        (N, L, F)`` for ``side`` ``q`` or ``k``; ``(2, N, L, d) -> (2, N, L, F)`` for ``qk``
        (queries then keys, in one pass). ``parameters``: :meth:`_side_parameters` of ``side``,
        where the caller built them once for many calls."""
        stacked = u if side == "qk" else u.unsqueeze(0)
        sides, n, length, dim = stacked.shape
        if parameters is None:
            parameters = self._side_parameters(side)
        rows = stacked.reshape(sides, n * length, dim)
        if self._hedgehog:
            features = ops.softmax_features(ops.stacked_linear(rows, *parameters["hedgehog"]))
        else:
            features = ops.relu_features(rows)
        if self.attn_type == "leap":  # the MLPs read relu(u) whichever features they re-weight
            hidden = ops.relu_features(rows) if self._hedgehog else features
            if "norm" in parameters:
                weight, bias = parameters["norm"]
                hidden = torch.addcmul(bias, weight, F.layer_norm(
                    hidden, (dim,), eps=self.leap_q[0].eps))
            hidden = torch.relu(ops.stacked_linear(hidden, *parameters["hidden"]))
            proportion = torch.sigmoid(ops.stacked_linear(hidden, *parameters["out"]))
            features = ops.sincos_features(features, proportion)
        elif self.attn_type == "cosformer":
            proportion = self._per_head(
                ops.cosformer_proportions(positions, self.cosformer_max_positions)
            ).to(u.dtype)
            features = ops.sincos_features(
                features, proportion.expand(sides, n, length).reshape(sides, n * length, 1))
        features = features.view(sides, n, length, -1)
        return features if side == "qk" else features[0]

    def _parallel_features(self, u: Tensor, side: str, positions: Optional[Tensor],
                           parameters: Optional[Dict[str, Tuple[Tensor, ...]]] = None) -> Tensor:
        """:meth:`_features` for the parallel forms: through ``COMPILED_FEATURES`` in training
        mode with ``compile_feature_map``, eager otherwise."""
        if self.compile_feature_map and self.training:
            return COMPILED_FEATURES(self, u, side, positions, parameters)
        return self._features(u, side, positions, parameters)

    def _feature_dim(self) -> int:
        """Width of ``phi``: d (linear), 2d (cosFormer, LeaP on ReLU, Hedgehog), 4d (LeaP on
        Hedgehog's features)."""
        width = 2 * self.head_dim if self._hedgehog else self.head_dim
        return width if self.attn_type in ("linear", "hedgehog") else 2 * width

    def _load_state(
        self, buffer: Dict[str, Optional[Tensor]], bsz: int, position_name: str, like: Tensor
    ) -> Tuple[ops.LinearAttentionState, Optional[Tensor]]:
        """The ``(B * H, ...)`` recurrent state and the position counter (:meth:`_position`)
        from a buffer; an empty state on ``like``'s device, for ``like``'s dtype, if the buffer
        has none."""
        position = self._position(buffer, position_name, bsz, like.device)
        if "kv_state" not in buffer:
            state = ops.empty_state(
                bsz * self.num_heads, self._feature_dim(), self.head_dim, like.device, like.dtype
            )
            return state, position
        return ops.LinearAttentionState(buffer["kv_state"], buffer["k_sum"]), position

    def _position(self, buffer: Dict[str, Optional[Tensor]], name: str, bsz: int,
                  device: torch.device) -> Optional[Tensor]:
        """The counter ``name`` of tokens seen per sentence, ``(B,)`` (0 before any), kept
        only where positions are read (cosFormer's features, unit-causal steps); otherwise
        ``None``, which costs the decode loop nothing."""
        if not self._counts_positions:
            return None
        position = buffer.get(name)
        return torch.zeros(bsz, device=device) if position is None else position

    @staticmethod
    def _store_state(
        buffer: Dict[str, Optional[Tensor]],
        state: ops.LinearAttentionState,
        position: Optional[Tensor],
        position_name: str,
    ) -> None:
        """Keep the state as computed, ``(B * H, ...)`` (``PER_HEAD_BUFFERS``), and the
        position counter, if kept."""
        buffer["kv_state"], buffer["k_sum"] = state
        if position is not None:
            buffer[position_name] = position

    @staticmethod
    def _is_future_mask(attn_mask: Tensor, length: int) -> bool:
        """True if ``attn_mask`` blocks exactly the keys after each query (fairseq's future
        mask)."""
        if attn_mask.shape != (length, length):
            return False
        blocked = attn_mask if attn_mask.dtype == torch.bool else torch.isinf(attn_mask)
        future = torch.ones(length, length, dtype=torch.bool, device=attn_mask.device).triu(1)
        return torch.equal(blocked, future)

    # ------------------------------------------------------------------- softmax
    def _softmax_forward(
        self, query, key, value, key_padding_mask, incremental_state, need_weights,
        static_kv, attn_mask, before_softmax, need_head_weights, key_limit,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """fairseq's attention, with ``causal`` and ``key_limit`` turned into fairseq masks
        (``(T, S)``, or ``(B * H, T, S)`` per sentence)."""
        blocked = None
        if self.causal and attn_mask is None and query.size(0) > 1:
            # new token t sees the cached keys and new tokens 0 .. t (or its whole unit)
            length = query.size(0)
            cached = 0
            if incremental_state is not None:
                prev_key = self._get_input_buffer(incremental_state).get("prev_key")
                cached = 0 if prev_key is None else prev_key.size(2)
            if self.unit_causal:
                key_index = torch.arange(cached + length, device=query.device)
                limit = self.unit_causal_limit(length, cached, query.device)
                blocked = key_index[None, :] >= limit[:, None]
            else:
                blocked = torch.ones(length, cached + length, dtype=torch.bool,
                                     device=query.device).triu(cached + 1)
            if incremental_state is None and key_padding_mask is not None:
                # a padded query (left padding) sees its sentence's keys, not none: no
                # all-masked softmax row (NaN in some kernels); no real row reads its output
                blocked = self._per_head(blocked & ~key_padding_mask[:, :, None])
        if key_limit is not None:
            source_length = query.size(0) if key is None else key.size(0)
            key_index = torch.arange(source_length, device=query.device)
            beyond = key_index >= self._per_head(key_limit).unsqueeze(-1)
            blocked = beyond if blocked is None else (blocked | beyond)
        if blocked is not None:
            extra = torch.zeros(blocked.shape, dtype=query.dtype, device=query.device)
            extra = extra.masked_fill(blocked, float("-inf"))
            attn_mask = extra if attn_mask is None else attn_mask + extra
        if incremental_state is None:
            # static_kv only matters for the incremental cache; without one, fairseq's
            # F.multi_head_attention_forward path is taken, which accepts per-sentence masks
            static_kv = False
        return super().forward(
            query, key, value, key_padding_mask=key_padding_mask,
            incremental_state=incremental_state, need_weights=need_weights, static_kv=static_kv,
            attn_mask=attn_mask, before_softmax=before_softmax,
            need_head_weights=need_head_weights,
        )


# The feature map of training passes with ``compile_feature_map``: one compiled function for
# every module (the compiler guards on what the map reads: the attention type, the side, the
# dtype), eager with one warning where compilation fails.
COMPILED_FEATURES = ops.Compiled(LeaPMultiheadAttention._features, "compile_feature_map "
                                 "(--compile-feature-map)", recompile_limit=32)
