"""Cache layers for selection policies: every token is kept (one copy), attention reads a subset.

`SelectionLayer` replaces a fresh `DynamicLayer` of the model's own cache (the one `generate()`
builds) for the layers a selection policy runs on; other layers are left alone. It differs from
`DynamicLayer` in three ways:

* `pre_rope=True` stores keys *un-rotated*: HF rotates keys before `Cache.update`, so the layer
  un-rotates them with the (cos, sin) of the same call (set by the policy's pre-hook in
  `incoming_rope`). One copy of K, from which any position can be re-applied.
* Appends write into a buffer with `GROW` tokens of headroom instead of `torch.cat`, so a decode
  step copies one token, not the whole cache. `keys`/`values` are views of the buffer; if anything
  replaces them (crop, beam reorder, offload) the layer adopts the new tensors.
* `key_order` ([Hk, D] long, None = natural): keys may be stored with each head's dims permuted,
  column j of head h holding dim key_order[h, j] (FASA puts each head's dominant dims first, so
  its scorer reads a contiguous d-column slice). Readers un-permute with `key_columns`, the
  inverse (`tokaccel.kernels.indexed_attention.natural_columns`, or the attention kernels' own
  `key_columns`). The order is set before the first token and never changes while tokens are held.
* `key_tile` (w, None = rows): keys may be stored as D/w column tiles, `keys` [B, Hk, D/w, N, w]
  (tile t holds stored columns [t*w, (t+1)*w) of every token), so FASA's leading d = w columns
  are one contiguous [N, d] block per head instead of a strided slice of the rows (a CPU scores a
  strided slice 1.4-2.2x slower, `benchmarks/score_tiles.py`). The token axis stays dim -2, so
  HF's crop / batch edits work unchanged; readers see 5-D keys and untile what they read.
* `selection` holds the policy's per-sequence state (the selection cache) and `block_index` a
  hierarchical policy's per-block key summaries (`tokaccel.blocks.BlockIndex`, small tensors
  beside K, never a copy of it); any batch or length edit (crop, reorder, reset) drops both.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .rope import unrotate

logger = logging.getLogger(__name__)

GROW = 256  # tokens of headroom per reallocation


# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache` (the
# old names still work, with a deprecation warning, until 5.40). These helpers accept both.
def call_cache(kwargs: dict) -> Cache | None:
    """The Cache a model, decoder layer or attention module was called with."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def output_cache(output) -> Cache | None:
    """The Cache of a model or `generate` output."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name `model.forward` takes its Cache by: "cache" (transformers >= 5.24) or "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class SelectionLayer(DynamicLayer):
    """A DynamicLayer that keeps every token, pre-RoPE keys when `pre_rope`, and selection state."""

    def __init__(self, pre_rope: bool, rope_scaling: float = 1.0):
        super().__init__()
        self.pre_rope = pre_rope
        self.rope_scaling = rope_scaling
        self.incoming_rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin) of the next update
        self.selection: Any = None
        self.block_index: Any = None
        self.key_order: torch.Tensor | None = None  # [Hk, D] long: stored column j of head h holds dim [h, j]
        self.key_columns: torch.Tensor | None = None  # [Hk, D] long, the inverse: dim i of head h at column [h, i]
        self.key_tile: int | None = None  # w: keys stored [B, Hk, D/w, N, w]; None: [B, Hk, N, D]
        self._order_given: torch.Tensor | None = None
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def __repr__(self):
        return f"SelectionLayer(pre_rope={self.pre_rope}, tokens={self.get_seq_length()})"

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append [B, Hk, S, D] keys (un-rotated first when `pre_rope`) and values; returns the
        views (keys, values) of everything stored: [B, Hk, N, D], keys [B, Hk, D/w, N, w] when tiled."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pre_rope:
            if self.incoming_rope is None:
                raise RuntimeError("SelectionLayer(pre_rope=True).update called without the (cos, sin) of the "
                                   "new tokens; the layer is installed by a tokaccel policy's pre-hook")
            cos, sin = self.incoming_rope
            key_states = unrotate(key_states, cos, sin, self.rope_scaling)
        self.incoming_rope = None
        self.keys, self._kbuf = _append(self.keys, self._kbuf, self._stored_layout(key_states))
        self.values, self._vbuf = _append(self.values, self._vbuf, value_states)
        return self.keys, self.values

    def _stored_layout(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys [B, Hk, S, D] in natural rows -> the layout the layer stores: head dims in `key_order`,
        then column tiles [B, Hk, D/w, S, w] when `key_tile`."""
        if self.key_order is not None:
            if self.key_order.device != keys.device:
                self.key_order, self.key_columns = self.key_order.to(keys.device), self.key_columns.to(keys.device)
            keys = keys.gather(3, self.key_order[None, :, None, :].expand(keys.shape))
        if self.key_tile is not None:
            from .kernels.indexed_attention import tile_keys  # lazy: keeps `import tokaccel` free of triton

            keys = tile_keys(keys, self.key_tile)
        return keys

    def use_key_order(self, order: torch.Tensor | None, tile: int | None = None) -> None:
        """Store keys with head dims in `order` ([Hk, D] long, each row a permutation; None =
        natural), in column tiles of width `tile` (None: rows; see the module docstring). Raises
        ValueError if tokens are already held in another layout."""
        if order is self._order_given and tile == self.key_tile:
            return
        if self.get_seq_length() > 0:
            held = self.key_order
            same = (held is None) == (order is None) and tile == self.key_tile and (
                order is None or (held.shape == order.shape and torch.equal(held.cpu(), order.cpu())))
            if not same:
                raise ValueError("this cache layer holds keys stored in another head-dim order or layout (written "
                                 "by another policy or configuration); start from a new cache")
        if tile is not None and (order is None or order.shape[1] % tile):
            raise ValueError(f"key_tile={tile} needs a key order whose head dim is a multiple of it")
        self._order_given = order
        self.key_order = order
        self.key_columns = None if order is None else order.argsort(dim=1)
        self.key_tile = tile

    def to_pre_rope(self, cos: torch.Tensor, sin: torch.Tensor, rope_scaling: float = 1.0) -> None:
        """Switch a layer that holds rotated keys to `pre_rope`: the N stored keys are un-rotated in
        place with the (cos, sin) [B, N, R] they were rotated with. The selection state and the
        block index, built from rotated keys, are dropped."""
        if self.pre_rope:
            return
        if self.get_seq_length() > 0:
            from .kernels.indexed_attention import natural_columns, untile_keys

            keys = unrotate(natural_columns(untile_keys(self.keys), self.key_columns), cos, sin, rope_scaling)
            self.keys.copy_(self._stored_layout(keys))
        self.pre_rope, self.rope_scaling = True, rope_scaling
        self.selection = self.block_index = None

    def allocated_bytes(self) -> int:
        """Bytes held by the K and V buffers (stored tokens plus at most GROW tokens of headroom)."""
        return sum(b.untyped_storage().nbytes() for b in (self._kbuf, self._vbuf) if b is not None)

    # Edits that change the batch or the length invalidate the selection state.
    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.selection = self.block_index = None

    def reset(self) -> None:
        super().reset()
        self._kbuf = self._vbuf = None
        self.selection = self.block_index = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.selection = self.block_index = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.selection = self.block_index = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.selection = self.block_index = None


def _append(view: torch.Tensor, buf: torch.Tensor | None, new: torch.Tensor):
    """Write `new` after `view` (a prefix of `buf` along the token axis, dim -2); returns the new
    (view, buf)."""
    n, s = (view.shape[-2] if view.dim() == new.dim() else 0), new.shape[-2]
    ours = (buf is not None and view.dim() == new.dim() and view.data_ptr() == buf.data_ptr()
            and view.shape[:-2] == buf.shape[:-2] and view.stride() == buf.stride())
    if not ours:  # first append, or keys/values were replaced by someone else: adopt them
        buf = view if view.dim() == new.dim() else None
    if buf is None or buf.shape[-2] < n + s or buf.shape[:-2] != new.shape[:-2]:
        grown = new.new_empty(*new.shape[:-2], n + s + GROW, new.shape[-1])
        if n:
            grown[..., :n, :].copy_(view)
        buf = grown
    buf[..., n:n + s, :].copy_(new)
    return buf[..., :n + s, :], buf


def install_selection_layer(cache: Cache, layer_idx: int, pre_rope: bool, rope_scaling: float = 1.0) -> SelectionLayer:
    """The SelectionLayer at `layer_idx` of `cache`, installed in place of a fresh DynamicLayer.

    Raises ValueError when the slot holds another kind of layer (static, quantized, sliding: the
    policy needs every token kept) or a DynamicLayer already filled without the policy.
    """
    layers = cache.layers
    while len(layers) < layer_idx and cache.layer_class_to_replicate is not None:  # lazily grown caches
        layers.append(cache.layer_class_to_replicate())
    if len(layers) == layer_idx:
        layers.append(SelectionLayer(pre_rope, rope_scaling))
        logger.debug("cache layer %d: %r added", layer_idx, layers[layer_idx])
    layer = layers[layer_idx]
    if isinstance(layer, SelectionLayer):
        if layer.pre_rope != pre_rope:
            raise ValueError(f"cache layer {layer_idx} was filled by a policy that stores "
                             f"{'pre' if layer.pre_rope else 'post'}-RoPE keys; start from a new cache")
        return layer
    if type(layer) is not DynamicLayer:
        raise ValueError(f"cache layer {layer_idx} is a {type(layer).__name__}; token selection needs a dynamic "
                         "cache that keeps every token (DynamicCache, the default of generate())")
    if layer.get_seq_length() > 0:
        raise ValueError(f"cache layer {layer_idx} already holds {layer.get_seq_length()} tokens written without "
                         "tokaccel; patch the model before filling the cache, or start from a new cache")
    layers[layer_idx] = SelectionLayer(pre_rope, rope_scaling)
    logger.debug("cache layer %d: DynamicLayer replaced by %r", layer_idx, layers[layer_idx])
    return layers[layer_idx]


# ---------------------------------------------------------------------------------------- eviction
class EvictionLayer(DynamicLayer):
    """A cache layer that physically holds at most `budget` tokens per KV head (docs/methods.md §2).

    Slots are per (row, KV head): each head keeps its own tokens, so slot j of two heads may hold
    different positions. Per slot the layer keeps `pos` (the token's index in the padded sequence,
    long), `valid` (False: left padding or an empty slot) and `score` (the policy's running
    importance, fp32). Slots are not in time order after a decode step (the evicted slot is reused
    by the last one), which attention does not care about: keys carry their RoPE positions.

    A call goes `update` (new tokens appended, stored + q slots) -> the policy's attention ->
    `evict` (back to at most `budget`). `get_seq_length()` counts every token ever seen, so HF
    positions stay right; `get_mask_sizes(q)` = (stored + q, seen - stored): HF's mask is right for
    the new tokens' columns only, the policy masks stored slots with `valid` itself.
    """

    is_croppable = False

    def __init__(self, budget: int | float):
        super().__init__()
        self.budget_spec = budget
        self.budget: int | None = None if isinstance(budget, float) else int(budget)  # a fraction resolves on the prompt
        self.seen = 0
        self.stored = 0  # slots held before the current call's new tokens
        self.row_start: torch.Tensor | None = None  # [B] long: index of each row's first real token
        self.has_padding = False
        self.pos = self.valid = self.score = None
        self._bufs: dict[str, torch.Tensor] | None = None  # name -> [B, Hk, capacity, ...] storage of the slots

    def __repr__(self):
        return f"EvictionLayer(budget={self.budget_spec}, stored={self.stored}, seen={self.seen})"

    # ---------------------------------------------------------------- HF layer API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append [B, Hk, q, D] keys/values; returns every slot [B, Hk, stored + q, D] (stored first)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys.dim() == 4 and self.keys.shape[-2] != self.stored:
            raise RuntimeError(f"EvictionLayer: {self.keys.shape[-2] - self.stored} tokens of the previous call "
                               "were never evicted (the attention of this layer did not run tokaccel's policy)")
        B, Hk, q = key_states.shape[:3]
        if self.budget is None:
            self.budget = max(1, round(self.budget_spec * q))
        dev = key_states.device
        new = {"keys": key_states, "values": value_states,
               "pos": torch.arange(self.seen, self.seen + q, device=dev).expand(B, Hk, q),
               "valid": torch.ones(B, Hk, q, dtype=torch.bool, device=dev),
               "score": torch.zeros(B, Hk, q, dtype=torch.float32, device=dev)}
        n = self.stored
        if self._bufs is None or self._bufs["keys"].shape[2] < n + q:  # one spare slot: a decode step copies nothing
            bufs = {name: t.new_empty(*t.shape[:2], n + q + 1, *t.shape[3:]) for name, t in new.items()}
            if n:
                for name in bufs:
                    bufs[name][:, :, :n].copy_(getattr(self, name))
            self._bufs = bufs
        for name, t in new.items():
            self._bufs[name][:, :, n:n + q].copy_(t)
            setattr(self, name, self._bufs[name][:, :, :n + q])
        self.seen += q
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, self.seen - self.stored

    def get_max_length(self) -> int:
        return -1

    # ---------------------------------------------------------------- called by the policy
    def admit(self, new_valid: torch.Tensor | None) -> None:
        """Mark which of the pending new tokens are real: new_valid [B, q] bool (None: all)."""
        if new_valid is None:
            if self.row_start is None:
                self.row_start = torch.zeros(self.keys.shape[0], dtype=torch.long, device=self.keys.device)
            return
        q = new_valid.shape[1]
        self.valid[:, :, -q:] = new_valid[:, None, :]
        if not bool(new_valid.all()):
            self.has_padding = True
        if self.row_start is None:  # first real token of each row (left padding comes first)
            first = new_valid.int().argmax(dim=1)
            self.row_start = torch.where(new_valid.any(dim=1), first + self.seen - q, self.seen)

    def evict(self, priority: torch.Tensor) -> int:
        """Keep the `budget` slots of highest priority ([B, Hk, n] fp32, over every slot) per KV
        head; invalid slots go first whatever their priority. Returns the real tokens dropped."""
        n = self.keys.shape[-2]
        surplus = n - self.budget
        if surplus <= 0:
            self.stored = n
            return 0
        priority = priority.masked_fill(~self.valid, float("-inf"))
        if surplus == 1:  # decode: move the last slot into the dropped one, no reallocation
            drop = priority.argmin(dim=-1, keepdim=True)  # [B, Hk, 1]
            dropped = int(self.valid.gather(2, drop).sum())
            for name in ("keys", "values", "pos", "valid", "score"):
                t = getattr(self, name)
                last = t[:, :, -1:].clone()
                index = drop if t.dim() == 3 else drop[..., None].expand(-1, -1, -1, t.shape[-1])
                t.scatter_(2, index, last)
                setattr(self, name, t[:, :, :-1])
        else:
            keep = priority.topk(self.budget, dim=-1).indices.sort(dim=-1).values  # [B, Hk, budget]
            dropped = int(self.valid.sum()) - int(self.valid.gather(2, keep).sum())
            for name in ("keys", "values", "pos", "valid", "score"):
                t = getattr(self, name)
                index = keep if t.dim() == 3 else keep[..., None].expand(-1, -1, -1, t.shape[-1])
                kept = t.gather(2, index)
                buf = self._bufs[name] = kept.new_empty(*kept.shape[:2], self.budget + 1, *kept.shape[3:])
                buf[:, :, :self.budget].copy_(kept)
                setattr(self, name, buf[:, :, :self.budget])
        self.stored = self.budget
        return dropped

    def allocated_bytes(self) -> int:
        """Bytes held by the slot buffers (K, V and the per-slot metadata), the spare slot included."""
        return sum(t.untyped_storage().nbytes() for t in (self._bufs or {}).values())

    # ---------------------------------------------------------------- edits
    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an eviction cache cannot be cropped: evicted tokens are gone (speculative and "
                                  "assisted decoding need a cache that keeps every token)")

    def reset(self) -> None:
        self.__init__(self.budget_spec)

    def _rows(self, fn) -> None:
        """Apply a batch edit (rows selected, repeated or reordered) to every per-row tensor."""
        self._bufs = None  # the edited tensors are fresh; the next update reallocates
        for name in ("keys", "values", "pos", "valid", "score", "row_start"):
            t = getattr(self, name)
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                setattr(self, name, fn(t))
        if self.keys is not None and self.keys.dim() == 4:
            self._bufs = {name: getattr(self, name) for name in ("keys", "values", "pos", "valid", "score")}

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))


def install_eviction_layer(cache: Cache, layer_idx: int, budget: int | float) -> EvictionLayer:
    """The EvictionLayer at `layer_idx` of `cache`, installed in place of a fresh DynamicLayer
    (ValueError for a static/quantized/sliding layer or one already filled without the policy)."""
    layers = cache.layers
    while len(layers) < layer_idx and cache.layer_class_to_replicate is not None:
        layers.append(cache.layer_class_to_replicate())
    if len(layers) == layer_idx:
        layers.append(EvictionLayer(budget))
        return layers[layer_idx]
    layer = layers[layer_idx]
    if isinstance(layer, EvictionLayer):
        return layer
    if type(layer) is not DynamicLayer:
        raise ValueError(f"cache layer {layer_idx} is a {type(layer).__name__}; KV eviction needs a dynamic cache "
                         "(DynamicCache, the default of generate())")
    if layer.get_seq_length() > 0:
        raise ValueError(f"cache layer {layer_idx} already holds {layer.get_seq_length()} tokens written without "
                         "tokaccel; patch the model before filling the cache, or start from a new cache")
    layers[layer_idx] = EvictionLayer(budget)
    return layers[layer_idx]
