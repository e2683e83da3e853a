"""The selection engine: what every token-selection policy shares (TokenSelect, HISA, Quest, FASA).

A selection policy keeps every token in the cache and lets each attention call read
`sinks ∪ selected ∪ local window`. The engine does all of it except choosing: a policy is a
`SelectionPolicy` subclass whose *scorer*, `choose(call, q, start, end, valid, query_valid)`,
returns the <= k candidate rows of [start, end) to read (or, simpler, whose `vote` gives one vote
per candidate key and lets the default `choose` take the top k). Around the scorer the engine
runs:

* decode (one query): the scoring query picks candidates on a miss; a selection cache reuses the
  previous index set while cos(query, query at the last selection) >= theta.
* prefill (several queries): queries go in chunks of `chunk`; each chunk selects from the tokens
  before it and attends to `selection ∪ causal part of the chunk`.
* when the context fits the budget (`N <= n_init + k + n_local`) attention is dense.
* sparse reads: one kernel gathers the index set's K/V rows, re-rotates keys in compact mode and
  attends (`tokaccel.kernels.indexed_attention`).

`SelectionCall` is one such call. It needs no HF object: given queries, the cached keys and
values, a `LayerContext` (its `LayerInfo`, stats and `LayerRuntime`) and optionally a
`SelectionLayer`, it selects and attends, so another engine (vLLM) can reuse the scorers.
Speculative tree verification lives beside speculative decoding (`tokaccel.recycling.verify`): a
draft tree reaches `attend` as the `TREE_KWARG` forward kwarg, an object that verifies itself.

Positions: `position_mode="compact"` (TokenSelect's default) stores un-rotated keys
(`tokaccel.cache.SelectionLayer`) and rotates the gathered rows to positions 0..L-1 with the query
right after them, so no attended distance exceeds L; "original" keeps HF's rotated keys and
positions; "auto" is original while the sequence fits the model's trained length
(`max_position_embeddings`) plus `auto_overrun` tokens and compact beyond it: the forward that
takes a cache past that un-rotates the stored keys in place (`SelectionLayer.to_pre_rope`, at the
positions the call's `position_ids` imply) and the layer stays compact until the cache is
emptied. Compact positions are meant for contexts beyond the trained length; inside it they cost
accuracy at small budgets (docs/methods.md §1.1).

The last chunk of a prompt holds the question. A chunk's mean query over up to 512 tokens of
filler plus a question is dominated by the filler, so the chunk that holds the prompt's last token
selects with the votes of its last `tail` queries, each voting separately (votes summed, as in
SnapKV's observation window); `tail=0` is TokenSelect's mean. Measured on SmolLM2-135M (chat
passkey, prompt ending in "The pass key is", needle at depths 0.1-0.7, chunk 512, compact): share
of the needle's tokens in the last chunk's selection, mean over the 30 layers:

    context / budget        mean   tail=1  tail=8  tail=16  tail=32  tail=64
    1.9K, k=64 (n 16/64)    .12-.17 .25-.31 .23-.31   -     .19-.27  .17-.24
    1.9K, k=256 (32/128)    .56-.73 .62-.74 .66-.79   -     .62-.75  .58-.73
    2.9K, k=256 (32/128)    .49-.63 .58-.67 .64-.70 .64-.70 .59-.68  .56-.64

The tail vote beats the mean at every depth and budget; 8-16 queries are best (fewer: one
template token decides; more: filler dilutes again). Default 16: it still covers a question
behind a chat template's few closing tokens. Cost: `tail` x the scoring of one chunk, once per
prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..cache import SelectionLayer, call_cache, install_selection_layer
from ..rope import RopeTable, find_rotary_embedding, rotate, unrotate
from ..selection import (HEAD_MAPPINGS, DecodeRows, SelectionState, assemble, attend_rows, cache_hits, merge_rows,
                         top_k)
from ..validation import check_bool, check_choice, check_int, check_number, invalid, is_int
from .base import TREE_KWARG, LayerContext, LayerInfo, Policy
from .dense import dense_with_stats

POSITION_MODES = ("compact", "original", "auto")
ROW_SLACK = 128  # columns allocated past L in `DecodeRows`, for the hits that follow


@dataclass
class KeyLayout:
    """How a layer's cache stores keys, when a scorer wants them other than as natural rows.

    order: [Hk, D] long, stored column j of head h holds dim order[h, j] (e.g. FASA's dominant
        dims first, so its scorer reads a leading slice).
    tile: w, keys stored as D/w column tiles [B, Hk, D/w, N, w] (a contiguous [N, w] block per
        head and tile); None: rows [B, Hk, N, D].
    """

    order: torch.Tensor
    tile: int | None = None


@dataclass
class LayerRuntime:
    """Per-layer objects a selection policy sets at patch time (`LayerContext.state`); a scorer
    that needs more (FASA's dims) subclasses it."""

    rope: RopeTable | None = None
    trained_length: int | None = None  # the model's max_position_embeddings (position_mode="auto")
    tree_states: list | None = None  # per-node selection states of the last verified draft tree


@dataclass
class SelectionPolicy(Policy):
    """Base of the token-selection policies: the engine's options (defaults: TokenSelect's paper,
    except `tail`, tokaccel's) and everything but the scorer. A subclass sets `name`,
    `description`, its own options and defaults, and implements `vote` or `choose`.

    k: selected candidate tokens per layer and step (2048).
    n_init: attention-sink tokens always read, counted from each row's first real token (128).
    n_local: most recent tokens always read (512).
    chunk: prefill queries per chunk (512).
    theta: selection-cache threshold on cos(query, query of the last selection), in [0, 1];
        0 reuses forever, 1 only for an identical query (0.9).
    pool: None, or an odd max-pool kernel over the votes (keeps neighbours of strong tokens; 15
        keeps whole needle sentences where scattered tokens of them win without it).
    position_mode: "compact" (selected keys re-rotated to contiguous positions), "original" (the
        model's own positions) or "auto": original while the sequence fits the model's trained length
        (`config.max_position_embeddings`) plus `auto_overrun` tokens, compact beyond it; a cache
        switches once, in the forward that takes it past that length (its stored keys are
        un-rotated in place).
    auto_overrun: tokens a sequence may run past the trained length before "auto" switches (256):
        a prompt that fills the window is then answered in one position layout, with the few
        positions past the window that dense decoding would use too.
    head_mapping: "group" (query head h reads KV head h // G, as attention does) or
        "release_mod" (h mod Hk, the official TokenSelect release's GQA bug; for reproduction only).
    tail: the prompt's last chunk selects with the per-query votes of its last `tail` queries;
        0 = the chunk's mean query, as in TokenSelect.
    dense_fallback: dense attention when the context fits the budget; False forces the sparse
        path (used to test it, and to measure its overhead).
    reuse_rows: CPU decode keeps the K/V rows it gathered (keys re-rotated) and, while the
        selection cache hits, gathers only the rows the index set gained: a hit then reads rows
        sequentially instead of scattered over the cache. A workspace of about `budget` + steps
        since the last miss rows per layer, dropped with the selection (a batch reuses them while
        every row hits); False gathers every step.
    """

    captures_layer_inputs: ClassVar[bool] = True
    verifies_trees: ClassVar[bool] = True  # see tokaccel.recycling.verify

    k: int = 2048
    n_init: int = 128
    n_local: int = 512
    chunk: int = 512
    theta: float = 0.9
    pool: int | None = None
    position_mode: str = "compact"
    auto_overrun: int = 256
    head_mapping: str = "group"
    tail: int = 16
    dense_fallback: bool = True
    reuse_rows: bool = True

    # ------------------------------------------------------------------ the scorer
    def vote(self, q: torch.Tensor, keys: torch.Tensor, scale: float, valid, query_valid=None) -> torch.Tensor | None:
        """Votes [B, Nc] fp32 of scoring queries q [B, H, D] or [B, H, w, D] (query_valid [B, w])
        for candidate keys [B, Hk, Nc, D] (valid [B, Nc] bool or None), when the scorer ranks every
        candidate by a vote over its key row: the default `choose` then takes their top k. None:
        this policy's scorer is its own `choose`."""
        return None

    def choose(self, call: "SelectionCall", q: torch.Tensor, start: int, end: int, valid, query_valid=None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The scorer: the <= k candidates among cache rows [start, end) that the engine adds to the
        sinks and the local window. q [B, H, D] or [B, H, w, D] scoring queries (w queries per head,
        query_valid [B, w]); valid [B, end - start] bool or None (all candidates). Returns
        (rows [B, k'] absolute, sorted ascending, rows_valid [B, k']). Default: top k of `vote`."""
        vote = self.vote(q, call.key[:, :, start:end], call.scale, valid, query_valid)
        if vote is None:
            raise NotImplementedError(f"{type(self).__name__}: a selection policy implements vote() or choose()")
        call.count_scored(end - start)
        mid, mid_valid = top_k(vote, self.k, self.pool)
        return mid + start, mid_valid

    # ------------------------------------------------------------------ configuration
    def validate(self) -> None:
        for name, low in (("k", 1), ("n_init", 0), ("n_local", 1), ("chunk", 1), ("tail", 0), ("auto_overrun", 0)):
            check_int(self.name, name, getattr(self, name), low)  # n_local >= 1: the window holds the current token
        check_number(self.name, "theta", self.theta, 0, 1)
        if self.pool is not None and (not is_int(self.pool) or self.pool < 1 or self.pool % 2 == 0):
            raise invalid(self.name, "pool", self.pool, "expected None or an odd integer >= 1")
        check_choice(self.name, "position_mode", self.position_mode, POSITION_MODES)
        check_choice(self.name, "head_mapping", self.head_mapping, HEAD_MAPPINGS)
        check_bool(self.name, "dense_fallback", self.dense_fallback)
        check_bool(self.name, "reuse_rows", self.reuse_rows)

    @property
    def budget(self) -> int:
        """Tokens read per query when the context exceeds it: n_init + k + n_local."""
        return self.n_init + self.k + self.n_local

    @property
    def compact(self) -> bool:
        """Compact positions from the first token (position_mode="compact")."""
        return self.position_mode == "compact"

    def compact_at(self, ctx: LayerContext, length: int) -> bool:
        """Whether a sequence of `length` tokens attends with compact positions."""
        if self.position_mode != "auto":
            return self.compact
        limit = ctx.state.trained_length
        return limit is None or length > limit + self.auto_overrun

    def new_layer_state(self, layer: LayerInfo) -> LayerRuntime:
        return LayerRuntime()

    def standalone_state(self, layer: LayerInfo, rope: RopeTable | None) -> LayerRuntime:
        """The layer state for a layer outside a patched model (op benches, other engines): what
        `on_patch` would set, with stand-ins for anything calibrated on a model (FASA: random
        dominant chunks, which cost the same as calibrated ones)."""
        return LayerRuntime(rope=rope)

    def key_layout(self, state: LayerRuntime, device: torch.device | None) -> KeyLayout | None:
        """How the layer's cache stores keys on `device` (None: natural rows)."""
        return None

    def on_patch(self, model: torch.nn.Module, contexts: list[LayerContext]) -> list:
        """Give each active layer its rope table (compact mode) and a pre-hook that installs a
        SelectionLayer into the cache the layer is called with."""
        tables: dict[str, RopeTable] = {}
        handles = []
        for ctx in contexts:
            if ctx.policy is None:
                continue
            module = ctx.module
            if self.position_mode != "original":
                rotary = find_rotary_embedding(model, module.config)
                if rotary is None:
                    raise NotImplementedError(
                        f"{self.name}: position_mode={self.position_mode!r} needs the model's rotary embedding "
                        f"module (a *RotaryEmbedding); none found in {type(model).__name__}. "
                        "Use position_mode='original'")
                layer_type = ctx.info.layer_type
                ctx.state.rope = tables.setdefault(layer_type, RopeTable(rotary, layer_type))
                ctx.state.trained_length = getattr(module.config, "max_position_embeddings", None)
            handles.append(module.register_forward_pre_hook(self._install_hook(ctx), with_kwargs=True))
        return handles

    def _install_hook(self, ctx: LayerContext):
        layer_idx = ctx.info.layer_idx

        def hook(module, args, kwargs):
            cache = call_cache(kwargs)
            if cache is None:
                return
            held = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
            if getattr(held, "is_sliding", False):
                return  # a sliding-window layer (e.g. Mistral's): it stays dense, see attend()
            compact = self.compact
            if self.position_mode == "auto":
                compact = self._auto_mode(ctx, held, args, kwargs)
            scaling = ctx.state.rope.scaling if compact else 1.0
            layer = install_selection_layer(cache, layer_idx, compact, scaling)
            layout = self.key_layout(ctx.state, _device_of(args, kwargs))
            if layout is not None:
                layer.use_key_order(layout.order, layout.tile)
            if compact:
                if kwargs.get("position_embeddings") is None:
                    raise NotImplementedError(f"{self.name}: {type(module).__name__} is called without "
                                              "position_embeddings (cos, sin); use position_mode='original'")
                layer.incoming_rope = kwargs["position_embeddings"]

        return hook

    def _auto_mode(self, ctx: LayerContext, held, args: tuple, kwargs: dict) -> bool:
        """position_mode="auto": whether the layer's cache (`held`, None before the first call) stores
        pre-RoPE keys for this call; switches a filled layer to them when this call takes the sequence
        past the trained length."""
        past = held.get_seq_length() if held is not None else 0
        hidden = args[0] if args else kwargs["hidden_states"]
        compact = self.compact_at(ctx, past + hidden.shape[1])
        if not isinstance(held, SelectionLayer):
            return compact
        if past == 0:  # an emptied cache: a new sequence decides afresh
            held.pre_rope, held.rope_scaling = compact, ctx.state.rope.scaling if compact else 1.0
        elif held.pre_rope:
            return True
        elif compact:  # the stored keys were rotated at the positions HF gave them
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                raise NotImplementedError(f"{self.name}: position_mode='auto' needs the attention call's "
                                          "position_ids to switch to compact positions")
            offset = past - position_ids[:, :1].to(hidden.device)  # [B or 1, 1]: left padding
            positions = (torch.arange(past, device=hidden.device)[None] - offset).clamp_min(0)
            cos, sin = ctx.state.rope(int(positions.max()) + 1, hidden.device, torch.float32)
            held.to_pre_rope(cos[positions], sin[positions], ctx.state.rope.scaling)
            ctx.stats["position_switches"] += 1
        return compact

    # ------------------------------------------------------------------ attention
    def attend(self, ctx, module, query, key, value, attention_mask, **kwargs):
        tree = kwargs.pop(TREE_KWARG, None)
        if kwargs.get("sliding_window") is not None:
            return dense_with_stats(ctx, module, query, key, value, attention_mask, **kwargs)
        for unsupported in ("softcap", "s_aux"):
            if kwargs.get(unsupported) is not None:
                raise NotImplementedError(f"{self.name}: attention with {unsupported} is not supported")
        cache = ctx.inputs.get("cache")
        idx = ctx.info.layer_idx
        layer = cache.layers[idx] if cache is not None and idx < len(cache.layers) else None
        layer = layer if isinstance(layer, SelectionLayer) else None
        S, D, N = query.shape[2], query.shape[3], key.shape[-2]  # key: rows or column tiles (FASA on CPU)
        compact = layer.pre_rope if layer is not None else self.compact_at(ctx, N)
        q_pre = None
        if compact:
            cos, sin = ctx.inputs["position_embeddings"]
            scaling = ctx.state.rope.scaling
            if layer is None:  # no cache (use_cache=False): this call's keys are still rotated
                key = unrotate(key, cos, sin, scaling)
            q_pre = unrotate(query, cos, sin, scaling)
        if tree is not None:  # tokaccel.recycling.verify.TreeVerification
            return tree.attend(self, ctx, module, query, key, value, attention_mask, layer, q_pre, kwargs)
        if self.dense_fallback and N <= self.budget:
            key = natural_key_rows(key, layer)
            if compact:  # positions 0..N-1: the same distances as the model's own positions
                cos_t, sin_t = ctx.state.rope(N, query.device, query.dtype)
                query, key = rotate(q_pre, cos_t[N - S:], sin_t[N - S:]), rotate(key, cos_t, sin_t)
            return dense_with_stats(ctx, module, query, key, value, attention_mask, **kwargs)
        scale = attention_scale(module, kwargs, D)
        call = SelectionCall(self, ctx, q_pre if compact else query, key, value, key_valid_of(attention_mask, N),
                             scale, layer, compact)
        ctx.stats["sparse_calls"] += 1
        if S == 1:
            return call.decode(layer), None
        if layer is not None:
            layer.selection = None  # new tokens: the next decode step selects afresh
        return call.prefill(), None


def natural_key_rows(key: torch.Tensor, layer: SelectionLayer | None) -> torch.Tensor:
    """key read from `layer` (None: no cache) as rows [B, Hk, N, D] in the natural head-dim layout
    (a copy when the layer stores dims permuted or in column tiles, `SelectionLayer.key_order` /
    `key_tile`)."""
    from ..kernels.indexed_attention import natural_columns, untile_keys

    return natural_columns(untile_keys(key), layer.key_columns if layer is not None else None)


def _device_of(args: tuple, kwargs: dict) -> torch.device | None:
    """The device of an attention module's call (its hidden states)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    return hidden.device if isinstance(hidden, torch.Tensor) else None


def key_valid_of(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """[B, n] bool: which cached tokens are real (not padding), from HF's 4-D mask; None if all are."""
    if mask is None:
        return None
    last = mask[:, 0, -1, -n:]  # the last query sees every real key
    valid = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return None if bool(valid.all()) else valid


def attention_scale(module, kwargs: dict, head_dim: int) -> float:
    """The softmax scale of an attention call: HF's `scaling` kwarg, else the module's, else D^-0.5."""
    scale = kwargs.get("scaling")
    return float(scale if scale is not None else getattr(module, "scaling", head_dim ** -0.5))


class SelectionCall:
    """One sparse attention call of one layer: query [B, H, S, D] and key [B, Hk, N, D] both
    un-rotated in compact mode (as HF rotated them in original mode), value [B, Hk, N, D],
    key_valid [B, N] or None. key_columns [Hk, D]: the layer stores key dims permuted (natural dim
    i of head h at column [h, i]; `SelectionLayer.key_order`), None: natural. key may also be
    column tiles [B, Hk, D/w, N, w] (`SelectionLayer.key_tile`, FASA on CPU): hence key.shape[-2]."""

    def __init__(self, policy: SelectionPolicy, ctx: LayerContext, query, key, value, key_valid, scale, layer=None,
                 compact: bool | None = None):
        self.p, self.ctx, self.layer = policy, ctx, layer  # layer: the SelectionLayer, None without a cache
        self.compact = policy.compact if compact is None else compact  # compact positions in this call
        self.query, self.key, self.value = query, key, value
        self.key_columns = layer.key_columns if layer is not None else None
        self.key_valid, self.scale = key_valid, scale
        B = query.shape[0]
        self.first = (key_valid.int().argmax(1) if key_valid is not None
                      else torch.zeros(B, dtype=torch.long, device=query.device))

    def natural_keys(self) -> torch.Tensor:
        """The call's keys as rows [B, Hk, N, D] in the natural head-dim layout (a copy when the
        layer stores them permuted or tiled)."""
        return natural_key_rows(self.key, self.layer)

    # -- selection -------------------------------------------------------------------------
    def scoring_query(self, q: torch.Tensor) -> torch.Tensor:
        """Queries [B, H, ..., D] as they score: in compact mode un-rotated, then rotated at
        position n_local against un-rotated keys (every candidate at distance n_local)."""
        if not self.compact:
            return q
        cos, sin = self.ctx.state.rope(self.p.n_local + 1, q.device, q.dtype)
        cos, sin = cos[self.p.n_local:], sin[self.p.n_local:]
        return rotate(q if q.dim() == 4 else q[:, :, None], cos, sin).reshape(q.shape)

    def select(self, q: torch.Tensor, end: int, query_valid=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k candidates in [first + n_init, end) of each row for scoring queries q:
        (mid [B, k'] sorted, valid [B, k'])."""
        B, device = q.shape[0], q.device
        start = int(self.first.min()) + self.p.n_init
        if end <= start:
            return (torch.zeros(B, 0, dtype=torch.long, device=device),
                    torch.zeros(B, 0, dtype=torch.bool, device=device))
        valid = None
        if self.key_valid is not None:
            pos = torch.arange(start, end, device=device)
            valid = self.key_valid[:, start:end] & (pos >= (self.first + self.p.n_init)[:, None])
        mid, mid_valid = self.p.choose(self, q, start, end, valid, query_valid)
        for probe in self.ctx.probes:
            probe(self, q, start, end, valid, query_valid, mid, mid_valid)
        return mid, mid_valid

    def count_scored(self, tokens: int) -> None:
        """Account `tokens` keys read (per batch row) to score candidates."""
        self.ctx.stats["scored_keys"] += self.query.shape[0] * tokens
        self.ctx.stats["kv_bytes_read"] += self.query.shape[0] * tokens * self.key.shape[1] * self.query.shape[-1] * \
            self.key.element_size()

    def _read(self, rows: torch.Tensor | int, q: torch.Tensor, col_valid: torch.Tensor | None) -> torch.Tensor:
        """Attention of q [B, H, S, D], the last S of L positions, over the cached rows idx [B, L]
        (or the first `rows` rows) -> [B, S, H, D]: query i reads column j iff col_valid[:, j]
        ([B, L] bool, None = all) and j <= L - S + i. In compact mode keys are rotated to positions
        0..L-1 and the S queries to L-S..L-1 (fused in `indexed_prefill_attention` for an index set)."""
        from ..kernels.indexed_attention import indexed_prefill_attention

        B, H, S, D = q.shape
        L = rows if isinstance(rows, int) else rows.shape[1]
        self.ctx.stats.record_read(B, S, L, self.key.shape[1], D, self.key.element_size())
        if not isinstance(rows, int):
            cos = sin = None
            if self.compact:
                cos, sin = self.ctx.state.rope(L, q.device, torch.float32)
            return indexed_prefill_attention(q, self.key, self.value, rows, col_valid, self.scale, cos, sin,
                                             self.key_columns)
        k, v = natural_key_rows(self.key[..., :rows, :], self.layer), self.value[:, :, :rows]
        if self.compact:
            cos, sin = self.ctx.state.rope(L, q.device, q.dtype)
            k, q = rotate(k, cos, sin), rotate(q, cos[L - S:], sin[L - S:])
        if L == S and col_valid is None:  # a fresh prompt's leading chunks: SDPA skips the masked half
            return attend_rows(q, k, v, None, self.scale, causal=True)
        mask = torch.ones(S, L, dtype=torch.bool, device=q.device).tril_(L - S)
        if col_valid is not None:
            mask = (mask & col_valid[:, None, :])[:, None]
        return attend_rows(q, k, v, mask, self.scale)

    # -- decode --------------------------------------------------------------------------
    def decode(self, layer: SelectionLayer | None) -> torch.Tensor:
        p, stats = self.p, self.ctx.stats
        N = self.key.shape[-2]
        f = self.scoring_query(self.query[:, :, 0])  # [B, H, D]
        flat = f.reshape(f.shape[0], -1).float()
        state = layer.selection if layer is not None else None
        hits = cache_hits(state, flat, p.theta)
        n_hits = int(hits.sum())
        stats["selection_hits"] += n_hits
        stats["selection_misses"] += f.shape[0] - n_hits
        if n_hits < f.shape[0]:
            mid, mid_valid = self.select(f, max(N - p.n_local, 0))
            local = torch.full_like(self.first, max(N - p.n_local, 0))
            fresh = SelectionState(flat, mid, mid_valid, local)
            state = fresh if n_hits == 0 else merge_rows(hits, state, fresh)
            if layer is not None:
                layer.selection = state
        idx, valid = assemble(self.first, p.n_init, state.mid, state.mid_valid, state.local_start, N, self.key_valid)
        reuse = p.reuse_rows and layer is not None and idx.device.type == "cpu"
        return self.read_decode(idx, valid, state=state if reuse else None)

    def read_decode(self, idx: torch.Tensor, valid: torch.Tensor, query: torch.Tensor | None = None,
                     state: SelectionState | None = None) -> torch.Tensor:
        """The decode query [B, H, D] (default: the call's only one) over the rows idx [B, L]
        (left-aligned validity) -> [B, 1, H, D]: one kernel gathers the rows, rotates keys to 0..L-1
        and the query to L-1 (compact) and attends. With `state` (`reuse_rows`, CPU) the rows come
        from `_kept_rows` instead."""
        from ..kernels.indexed_attention import decode_attention_rows, indexed_decode_attention

        L = idx.shape[1]
        cos = sin = None
        if self.compact:
            cos, sin = self.ctx.state.rope(L, idx.device, torch.float32)
        start = L - valid.sum(1)
        query = self.query[:, :, 0] if query is None else query
        if state is None:
            out = indexed_decode_attention(query, self.key, self.value, idx, start, self.scale, cos, sin,
                                           self.key_columns)
        else:
            keys, values = self._kept_rows(state, idx, valid, cos, sin)
            out = decode_attention_rows(query, keys, values, start, self.scale, cos, sin)
        self.ctx.stats.record_read(idx.shape[0], 1, L, self.key.shape[1], query.shape[-1], self.key.element_size())
        return out[:, None]

    def _kept_rows(self, state: SelectionState, idx: torch.Tensor, valid: torch.Tensor, cos, sin
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V rows idx [B, L] (keys rotated to 0..L-1 when cos / sin) -> [B, Hk, L, D] each, kept in
        `state.rows`: when the last step's index set is a prefix of idx (a cache hit: same
        selection, the local window one token longer), only the new columns are gathered."""
        from ..kernels.indexed_attention import gather_decode_rows

        B, L = idx.shape
        rows, n = state.rows, 0
        if rows is not None and rows.idx.shape[1] <= L:
            n = rows.idx.shape[1]
            if not (torch.equal(idx[:, :n], rows.idx) and torch.equal(valid[:, :n], rows.valid)):
                n = 0
        new_k, new_v = gather_decode_rows(self.key, self.value, idx[:, n:], cos, sin, self.key_columns, first=n)
        if n == 0:  # a new selection (or rows not reusable): the gathered rows are the buffer
            rows = state.rows = DecodeRows(idx, valid, new_k, new_v)
        else:
            if rows.keys.shape[2] < L:  # the first hits after a miss: room for the next ones
                keys = rows.keys.new_empty(*rows.keys.shape[:2], L + ROW_SLACK, rows.keys.shape[3])
                values = rows.values.new_empty(keys.shape)
                keys[:, :, :n], values[:, :, :n] = rows.keys[:, :, :n], rows.values[:, :, :n]
                rows.keys, rows.values = keys, values
            rows.keys[:, :, n:L], rows.values[:, :, n:L] = new_k, new_v
            rows.idx, rows.valid = idx, valid
        self.ctx.stats["rows_reused"] += B * n
        return rows.keys[:, :, :L], rows.values[:, :, :L]

    # -- prefill ---------------------------------------------------------------------------
    def prefill(self) -> torch.Tensor:
        p = self.p
        q_all = self.query
        S = q_all.shape[2]
        past = self.key.shape[-2] - S
        outs = []
        start = 0
        if p.dense_fallback:  # leading chunks whose preceding context fits the budget: one dense read
            while start < S and past + start <= p.budget:
                start += p.chunk
            start = min(start, S)
            if start:
                valid = self.key_valid[:, :past + start] if self.key_valid is not None else None
                outs.append(self._read(past + start, q_all[:, :, :start], valid))
        for s in range(start, S, p.chunk):
            e = min(s + p.chunk, S)
            outs.append(self._prefill_chunk(q_all, past + s, past + e, last=e == S))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def _prefill_chunk(self, q_all: torch.Tensor, a: int, b: int, last: bool) -> torch.Tensor:
        """Queries at cache positions [a, b) read `sinks ∪ top-k ∪ local` of [0, a) and [a, b) causally."""
        p = self.p
        past = self.key.shape[-2] - q_all.shape[2]
        q = q_all[:, :, a - past:b - past]  # [B, H, c, D]
        q_valid = self.key_valid[:, a:b] if self.key_valid is not None else None
        if last and p.tail:
            w = min(p.tail, b - a)
            f = self.scoring_query(q[:, :, -w:])
            mid, mid_valid = self.select(f, max(a - p.n_local, 0), None if q_valid is None else q_valid[:, -w:])
        else:
            if q_valid is None:
                mean = q.float().mean(dim=2)
            else:
                weights = q_valid.float()[:, None, :, None]
                mean = (q.float() * weights).sum(2) / weights.sum(2).clamp_min(1.0)
            mid, mid_valid = self.select(self.scoring_query(mean.to(q.dtype)), max(a - p.n_local, 0))
        local = torch.full_like(self.first, max(a - p.n_local, 0))
        idx, valid = assemble(self.first, p.n_init, mid, mid_valid, local, a, self.key_valid)
        chunk_idx = torch.arange(a, b, device=q.device).expand(idx.shape[0], -1)
        chunk_valid = self.key_valid[:, a:b] if self.key_valid is not None else torch.ones_like(chunk_idx).bool()
        return self._read(torch.cat((idx, chunk_idx), dim=1), q, torch.cat((valid, chunk_valid), dim=1))
