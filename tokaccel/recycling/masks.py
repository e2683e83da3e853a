"""Tree verification masks (cache + own ancestors; sliding-window layers) and the attention entry that applies them."""

from __future__ import annotations


import torch
import torch.nn.functional as F

from .trees import TreeTemplate

def tree_mask(tree: TreeTemplate, prefix_valid: torch.Tensor, device) -> torch.Tensor:
    """[1, 1, n+1, P+n+1] bool: every node sees the valid prefix and its own ancestors."""
    n = tree.size + 1
    P = prefix_valid.shape[0]
    mask = torch.empty(1, 1, n, P + n, dtype=torch.bool, device=device)
    mask[0, 0, :, :P] = prefix_valid
    mask[0, 0, :, P:] = tree.ancestors.to(device)
    return mask


def sliding_tree_mask(tree: TreeTemplate, seen: int, window: int, prefix_valid: torch.Tensor, device) -> torch.Tensor:
    """The mask of a sliding-window layer that keeps min(seen, window - 1) of `seen` tokens: node
    at depth d (cache index seen + d) sees key index j iff seen + d - j < window (HF's rule)."""
    kept = min(seen, window - 1)
    n = tree.size + 1
    mask = torch.empty(1, 1, n, kept + n, dtype=torch.bool, device=device)
    key_index = torch.arange(seen - kept, seen, device=device)
    query_index = seen + tree.depth.to(device)
    mask[0, 0, :, :kept] = (query_index[:, None] - key_index[None, :] < window) & prefix_valid[seen - kept:]
    mask[0, 0, :, kept:] = tree.ancestors.to(device)
    return mask


def _tree_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """HF's SDPA attention, except that a masked call with several queries under GQA runs on the
    KV heads (queries of a group stacked, mask repeated) instead of materialising repeated K/V,
    which on CPU cost more than the attention itself (1.4 of 1.6 ms per SmolLM2 layer at 1K)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, S, D = query.shape
    Hk = key.shape[1]
    if attention_mask is None or S == 1 or H == Hk or dropout or kwargs.get("s_aux") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    G = H // Hk
    mask = attention_mask[:, :, :, : key.shape[-2]]
    q = query.reshape(B, Hk, G * S, D)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask.repeat(1, 1, G, 1), scale=scaling)
    return out.reshape(B, H, S, D).transpose(1, 2).contiguous(), None


_TREE_SDPA = "tokaccel_tree_sdpa"


def _attention_configs(model) -> list:
    configs = {}
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "config") and "Attention" in type(module).__name__:
            configs[id(module.config)] = module.config
    return list(configs.values())


class TreeAttention:
    """Context manager: decoder configs that use "sdpa" switch to `_tree_sdpa` (registered under
    "tokaccel_tree_sdpa" in AttentionInterface on first use); others (eager, flash, a tokaccel
    policy) are left alone."""

    _registered = False

    def __init__(self, model):
        self.configs = [c for c in _attention_configs(model) if c._attn_implementation == "sdpa"]

    def __enter__(self):
        if self.configs and not TreeAttention._registered:
            from transformers import AttentionInterface

            AttentionInterface.register(_TREE_SDPA, _tree_sdpa)
            TreeAttention._registered = True
        for c in self.configs:
            c._attn_implementation_internal = _TREE_SDPA

    def __exit__(self, *exc):
        for c in self.configs:
            c._attn_implementation_internal = "sdpa"


def _layer_types(model) -> list[str] | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "layer_types", None)


def tree_masks(model, tree: TreeTemplate, cache, seen: int, prefix_valid: torch.Tensor, device):
    """The verify forward's attention mask: one tensor, or per layer type for hybrid models."""
    sliding = [layer for layer in cache.layers if getattr(layer, "is_sliding", False)]
    if not sliding:
        return tree_mask(tree, prefix_valid, device)
    windows = {layer.sliding_window for layer in sliding}
    if len(windows) != 1:
        raise NotImplementedError("token recycling: sliding-window layers with different windows are not supported")
    window_mask = sliding_tree_mask(tree, seen, windows.pop(), prefix_valid, device)
    if len(sliding) == len(cache.layers):  # e.g. Mistral: one sliding window for every layer
        return window_mask
    types = _layer_types(model)
    if not types:
        raise NotImplementedError("token recycling: a model mixing sliding and full layers without "
                                  "`config.layer_types` is not supported")
    masks = {t: tree_mask(tree, prefix_valid, device) for t in set(types) if t != "sliding_attention"}
    masks["sliding_attention"] = window_mask
    return masks
