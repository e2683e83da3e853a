"""Soft vote: per-row softmax over tokens, then a weighted sum over rows (TokenSelect's head vote).

Shapes (notation of docs/methods.md): ``B`` batch, ``R`` score rows (query heads, or heads x
queries), ``N`` tokens.

    scores   [B, R, N] fp32   logits, -inf for tokens that are not candidates
    weights  [B, R]    fp32   per-row weight (None: 1), e.g. 0 for a padded query
    vote     [B, N]    fp32   vote[b, t] = sum_r weights[b, r] * softmax_t(scores[b, r, :])[t]

A row whose scores are all -inf contributes nothing. Two passes over the logits: (1) the
max and exp-sum of every row, (2) one normalised, weighted sum over rows per token tile.
"""
from __future__ import annotations

from typing import Optional

import torch

from .dispatch import HAS_TRITON, register_op

__all__ = ["softmax_head_sum", "softmax_head_sum_reference", "check_softmax_head_sum_inputs"]


def check_softmax_head_sum_inputs(scores: torch.Tensor, weights: Optional[torch.Tensor] = None) -> None:
    """Raise ValueError (TypeError for non-tensors) naming what is wrong with ``scores`` / ``weights``."""
    name = "softmax_head_sum"
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name}: scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 3 or scores.dtype != torch.float32:
        raise ValueError(f"{name}: scores must be fp32 [B, R, N], got {scores.dtype} {tuple(scores.shape)}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor):
            raise TypeError(f"{name}: weights must be None or a torch.Tensor, got {type(weights).__name__}")
        if tuple(weights.shape) != tuple(scores.shape[:2]) or weights.dtype != torch.float32:
            raise ValueError(f"{name}: weights must be fp32 {tuple(scores.shape[:2])}, got "
                             f"{weights.dtype} {tuple(weights.shape)}")
        if weights.device != scores.device:
            raise ValueError(f"{name}: weights on {weights.device}, scores on {scores.device}")


def head_row_stats(m: torch.Tensor, l: torch.Tensor, weights: Optional[torch.Tensor]):
    """(max made finite, weight / exp-sum with 0 for empty rows), both [B, R, 1]."""
    coef = torch.where(l > 0, 1.0 / l.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(l))
    if weights is not None:
        coef = coef * weights[..., None]
    return m.clamp_min(torch.finfo(torch.float32).min), coef


def softmax_head_sum_reference(
    scores: torch.Tensor, weights: Optional[torch.Tensor] = None, *, overwrite: bool = False
) -> torch.Tensor:
    """Torch reference of :func:`softmax_head_sum` (also the CPU implementation).

    scores [B, R, N] fp32, weights [B, R] fp32 or None -> [B, N] fp32. ``overwrite=True`` lets
    it exponentiate ``scores`` in place (no [B, R, N] temporary); the row sum is one batched
    [1, R] x [R, N] product.
    """
    if scores.shape[-1] == 0:
        return scores.new_zeros(scores.shape[0], 0)
    m = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    e = scores.sub_(m).exp_() if overwrite else (scores - m).exp_()
    _, coef = head_row_stats(m, e.sum(-1, keepdim=True), weights)
    return torch.bmm(coef.transpose(1, 2), e).squeeze(1)


if HAS_TRITON:
    from ._soft_vote_triton import softmax_head_sum_triton as _triton_launcher
else:  # pragma: no cover - depends on the environment
    _triton_launcher = None

_OP = register_op("softmax_head_sum", softmax_head_sum_reference, _triton_launcher)


def softmax_head_sum(
    scores: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    overwrite: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Soft vote over rows: ``[B, N]`` fp32 with ``out[b, t] = sum_r w[b, r] * softmax_t(scores[b, r])[t]``.

    Args:
        scores: ``[B, R, N]`` fp32, -inf where a token is not a candidate (last dim contiguous).
        weights: ``[B, R]`` fp32 or None (all 1).
        overwrite: the torch path may reuse ``scores`` as scratch (its values are then undefined).
        backend: ``"torch"``, ``"triton"`` or None (automatic, see ``tokaccel.kernels.dispatch``).
    """
    check_softmax_head_sum_inputs(scores, weights)
    return _OP(scores, weights, overwrite=overwrite, backend=backend)
