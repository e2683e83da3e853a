"""Last-row attention probabilities, averaged over heads: FastV's image-token score.

Shapes: ``B`` batch, ``H`` query heads, ``Hk`` KV heads (``G = H // Hk``; query head ``h``
reads KV head ``h // G``), ``N`` keys, ``D`` head dim.

    q      [B, H, D]        the query row of each sequence's last real token (RoPE applied)
    k      [B, Hk, N, D]    the layer's keys, NOT repeated for GQA
    valid  [B, N] bool      keys that may be attended (None: all)
    scale  float            the attention's softmax scale
    -> probs [B, N] fp32    mean over h of softmax_t(scale * q[b, h] . k[b, h // G, t]), 0 where not valid

FastV needs exactly this row of the [L, L] attention map; computing it from q and k lets the
layer itself run SDPA / flash-attention, which never return probabilities.
"""
from __future__ import annotations

from typing import Optional

import torch

from .dispatch import HAS_TRITON, register_op
from .grouped_scores import check_grouped_scores_inputs, grouped_scores_reference

__all__ = ["last_row_attention", "last_row_attention_reference"]


def last_row_attention_reference(q, k, scale: float, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Torch reference of :func:`last_row_attention` (also the CPU implementation): one grouped
    [B, Hk, G, D] x [B, Hk, D, N] product, a masked softmax, a mean over heads."""
    scores = grouped_scores_reference(q, k, scale)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = scores.softmax(-1).nan_to_num_(0.0)  # a row without valid keys gives zeros
    return probs.mean(1)


if HAS_TRITON:
    from ._last_row_triton import last_row_attention_triton as _triton_launcher
else:  # pragma: no cover - depends on the environment
    _triton_launcher = None

_OP = register_op("last_row_attention", last_row_attention_reference, _triton_launcher)


def last_row_attention(q, k, scale: float, valid: Optional[torch.Tensor] = None, *,
                       backend: Optional[str] = None) -> torch.Tensor:
    """Mean-over-heads softmax of one query row per sequence over its keys: [B, N] fp32 (see
    the module docstring)."""
    check_grouped_scores_inputs(q, k, scale)
    if scale is None:
        raise ValueError("last_row_attention: scale is required (the attention's softmax scale)")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != (k.shape[0], k.shape[2])):
        raise ValueError(f"last_row_attention: valid must be bool [{k.shape[0]}, {k.shape[2]}], "
                         f"got {valid.dtype} {tuple(valid.shape)}")
    return _OP(q, k, float(scale), valid, backend=backend)
