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
* `selection` holds the policy's per-sequence state (the selection cache); any batch or length
  edit (crop, reorder, reset) drops it.
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
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def __repr__(self):
        return f"SelectionLayer(pre_rope={self.pre_rope}, tokens={self.get_seq_length()})"

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append [B, Hk, S, D] keys (un-rotated first when `pre_rope`) and values; returns the
        views (keys, values) [B, Hk, N, D] of everything stored."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pre_rope:
            if self.incoming_rope is None:
                raise RuntimeError("SelectionLayer(pre_rope=True).update called without the (cos, sin) of the "
                                   "new tokens; the layer is installed by a tokaccel policy's pre-hook")
            cos, sin = self.incoming_rope
            key_states = unrotate(key_states, cos, sin, self.rope_scaling)
        self.incoming_rope = None
        self.keys, self._kbuf = _append(self.keys, self._kbuf, key_states)
        self.values, self._vbuf = _append(self.values, self._vbuf, value_states)
        return self.keys, self.values

    def allocated_bytes(self) -> int:
        """Bytes held by the K and V buffers (stored tokens plus at most GROW tokens of headroom)."""
        return sum(b.untyped_storage().nbytes() for b in (self._kbuf, self._vbuf) if b is not None)

    # Edits that change the batch or the length invalidate the selection state.
    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.selection = None

    def reset(self) -> None:
        super().reset()
        self._kbuf = self._vbuf = None
        self.selection = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.selection = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.selection = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.selection = None


def _append(view: torch.Tensor, buf: torch.Tensor | None, new: torch.Tensor):
    """Write `new` after `view` (a prefix of `buf` along dim -2); returns the new (view, buf)."""
    n, s = (view.shape[-2] if view.dim() == 4 else 0), new.shape[-2]
    ours = (buf is not None and view.dim() == 4 and view.data_ptr() == buf.data_ptr()
            and view.shape[:2] == buf.shape[:2] and view.stride() == buf.stride())
    if not ours:  # first append, or keys/values were replaced by someone else: adopt them
        buf = view if view.dim() == 4 else None
    if buf is None or buf.shape[-2] < n + s or buf.shape[:2] != new.shape[:2]:
        grown = new.new_empty(*new.shape[:2], n + s + GROW, new.shape[-1])
        if n:
            grown[:, :, :n].copy_(view)
        buf = grown
    buf[:, :, n:n + s].copy_(new)
    return buf[:, :, :n + s], buf


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
