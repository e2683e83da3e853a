"""Greedy diversity selection over token features: DivPrune's max-min (farthest point) and MMR.

Shapes: ``S`` independent sets (one per image), ``N`` tokens (padded to the longest set), ``D``
feature dim, ``K`` = max(k).

    x          [S, N, D]  fp32/fp16/bf16, rows L2-normalised by the caller (cosine = dot product)
    n          [S] long   valid tokens of each set (rows >= n[s] are padding)
    k          [S] long   tokens to pick from each set, 0 <= k[s] <= n[s]
    first      [S] long   the first pick of each set (callers choose it: DivPrune's token with
                          the farthest nearest neighbour, MMR's most important token)
    importance [S, N] fp32 or None
    lam        float in [0, 1]
    -> idx     [S, K] long, picks in order, -1 after k[s]

After the first pick, step t picks ``argmax_i lam * importance[i] - (1 - lam) * m[i]`` over the
unpicked valid tokens, where ``m[i] = max_{j picked} x_i . x_j`` is a running max updated with
one [N, D] x [D] product per step: O(K N D), never the O(K^2 N D) of recomputing max-min
from the picked set (DivPrune's official code) nor an N x N matrix. ``lam = 0`` is DivPrune
(maximise the min cosine distance 1 - m). Ties pick the lowest index.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from .dispatch import HAS_TRITON, register_op

__all__ = ["greedy_select", "greedy_select_reference", "farthest_first"]


def _check(x, n, k, first, importance, lam) -> None:
    name = "greedy_select"
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"{name}: x must be a [S, N, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: x must be fp32/fp16/bf16, got {x.dtype}")
    S, N, _ = x.shape
    for label, t in (("n", n), ("k", k), ("first", first)):
        if not isinstance(t, torch.Tensor) or t.shape != (S,) or t.dtype != torch.long:
            raise ValueError(f"{name}: {label} must be long [{S}], got {getattr(t, 'dtype', None)} "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if t.device != x.device:
            raise ValueError(f"{name}: {label} on {t.device}, x on {x.device}")
    if importance is not None and (importance.shape != (S, N) or importance.dtype != torch.float32):
        raise ValueError(f"{name}: importance must be fp32 [{S}, {N}] or None, got {importance.dtype} "
                         f"{tuple(importance.shape)}")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"{name}: lam must be a number in [0, 1], got {lam!r}")


def greedy_select_reference(x, n, k, first, importance=None, lam: float = 0.0) -> torch.Tensor:
    """Torch reference of :func:`greedy_select` (also the CPU implementation): each step is one
    batched [S, N, D] x [S, D] product over all sets; the loop runs over picks only."""
    S, N, _ = x.shape
    K = int(k.max()) if S else 0
    out = torch.full((S, K), -1, dtype=torch.long, device=x.device)
    if K == 0:
        return out
    xf = x.float()
    rows = torch.arange(S, device=x.device)
    blocked = torch.arange(N, device=x.device)[None, :] >= n[:, None]  # padding, then picked tokens
    run = torch.full((S, N), float("-inf"), device=x.device)
    base = lam * importance if importance is not None else torch.zeros(S, N, device=x.device)
    cur = first.clone()
    for t in range(K):
        active = t < k
        out[:, t] = torch.where(active, cur, -1)
        blocked[rows, cur] = True
        sim = torch.bmm(xf, xf[rows, cur].unsqueeze(-1)).squeeze(-1)
        run = torch.maximum(run, sim)
        obj = (base - (1.0 - lam) * run).masked_fill(blocked, float("-inf"))
        cur = obj.argmax(-1)
    return out


def farthest_first(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """DivPrune's first pick: the token whose nearest other token is farthest (cosine).

    x [S, N, D] unit rows, n [S] -> [S] long. One [S, N, N] batched product.
    """
    S, N, _ = x.shape
    xf = x.float()
    sim = torch.bmm(xf, xf.transpose(1, 2))
    ar = torch.arange(N, device=x.device)
    pad = ar[None, :] >= n[:, None]
    sim.masked_fill_(pad[:, None, :] | torch.eye(N, dtype=torch.bool, device=x.device)[None], float("-inf"))
    nearest = sim.amax(-1).masked_fill(pad, float("inf"))  # max similarity = min distance
    return nearest.argmin(-1)


if HAS_TRITON:
    from ._diversity_triton import greedy_select_triton as _triton_launcher
else:  # pragma: no cover - depends on the environment
    _triton_launcher = None

_OP = register_op("greedy_select", greedy_select_reference, _triton_launcher)


def greedy_select(x, n, k, first, importance: Optional[torch.Tensor] = None, lam: float = 0.0, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """Greedy max-min / MMR picks per set (see the module docstring): idx [S, K] long, -1 padded."""
    _check(x, n, k, first, importance, lam)
    if bool(((k < 0) | (k > n)).any()):
        raise ValueError(f"greedy_select: need 0 <= k <= n per set, got k={k.tolist()} n={n.tolist()}")
    return _OP(x, n, k, first, importance, float(lam), backend=backend)
