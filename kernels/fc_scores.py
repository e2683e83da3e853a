"""Partial-dim scoring for FASA (docs/methods.md §1.3): q . k over each KV head's dominant dims only.

Shapes (notation of docs/methods.md): ``B`` batch, ``R`` score rows (query heads, or heads x queries;
row ``r`` reads KV head ``r // (R // Hk)``), ``Hk`` KV heads, ``N`` tokens, ``D`` head dim,
``d`` dominant dims per KV head (2 per frequency chunk).

    fc_scores(q [B, R, D], keys_dom [B, Hk, N, d], dims [Hk, d] long, scale) -> [B, R, N] fp32
        scale * sum_j q[b, r, dims[hk, j]] * keys_dom[b, hk, t, j] with hk = r // (R // Hk).
        keys_dom holds only the dominant dims of each head, contiguous within a row (FASA's cache
        stores them first: keys_dom = K[..., :d], a strided view), so scoring reads d / D of the
        key bytes; q is gathered by `dims` inside the op.
"""
from __future__ import annotations

from typing import Optional

import torch

from .dispatch import HAS_TRITON, register_op
from .grouped_scores import grouped_scores_reference

__all__ = ["fc_scores", "fc_scores_reference", "gather_query_dims"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def gather_query_dims(q: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """q [B, R, D] -> [B, R, d]: row r keeps the dims of its KV head, dims[r // (R // Hk)]."""
    B, R, _ = q.shape
    Hk, d = dims.shape
    per_row = dims.repeat_interleave(R // Hk, dim=0)  # [R, d]
    return q.gather(2, per_row[None].expand(B, R, d))


def fc_scores_reference(q: torch.Tensor, keys_dom: torch.Tensor, dims: torch.Tensor, scale: float = 1.0
                        ) -> torch.Tensor:
    """Torch reference of :func:`fc_scores` (also the CPU path): gather q's dims, then one grouped
    matmul against the compact keys (never a copy of the full K)."""
    return grouped_scores_reference(gather_query_dims(q, dims).float(), keys_dom, float(scale))


def check_fc_scores_inputs(q, keys_dom, dims) -> None:
    name = "fc_scores"
    for what, t in (("q", q), ("keys_dom", keys_dom), ("dims", dims)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {what} must be a torch.Tensor, got {type(t).__name__}")
    if keys_dom.dim() != 4 or keys_dom.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: keys_dom must be [B, Hk, N, d] fp16/bf16/fp32, got {keys_dom.dtype} "
                         f"{tuple(keys_dom.shape)}")
    B, Hk, _, d = keys_dom.shape
    if dims.dtype != torch.long or tuple(dims.shape) != (Hk, d):
        raise ValueError(f"{name}: dims must be long [Hk, d] = {(Hk, d)}, got {dims.dtype} {tuple(dims.shape)}")
    if q.dim() != 3 or q.shape[0] != B or q.shape[1] == 0 or q.shape[1] % Hk:
        raise ValueError(f"{name}: q must be [B={B}, R, D] with R a positive multiple of Hk={Hk}, "
                         f"got {tuple(q.shape)}")
    if not (q.device == keys_dom.device == dims.device):
        raise ValueError(f"{name}: q, keys_dom, dims must share a device")


if HAS_TRITON:
    from ._fc_scores_triton import fc_scores_triton
else:  # pragma: no cover - depends on the environment
    fc_scores_triton = None

_OP = register_op("fc_scores", fc_scores_reference, fc_scores_triton)


def fc_scores(q: torch.Tensor, keys_dom: torch.Tensor, dims: torch.Tensor, scale: float = 1.0, *,
              backend: Optional[str] = None) -> torch.Tensor:
    """[B, R, N] fp32 partial logits over each KV head's dominant dims; see the module docstring."""
    check_fc_scores_inputs(q, keys_dom, dims)
    return _OP(q, keys_dom, dims, float(scale), backend=backend)
