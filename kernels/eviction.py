"""Attention probabilities for KV-eviction policies (H2O accumulates the probability each cached key
receives; a decode step gets it beside its output, a prefill call as column sums).

Shapes: ``B`` batch, ``H`` query heads, ``Hk`` KV heads, ``G = H // Hk`` (query head ``h`` reads KV
head ``h // G``; K/V are never repeated), ``N`` keys, ``S <= N`` queries, ``D`` head dim.

    decode_attention_probs(q [B, H, D], k, v [B, Hk, N, D], scale, key_valid [B, Hk, N] bool | None)
        -> out [B, H, D] (q's dtype) = softmax(scale * q . k^T over valid keys) @ v
           probs [B, Hk, N] fp32     = mean over the G heads of hk of those softmax weights, 0 at
                                       invalid keys (each (b, hk) must have at least one valid key)
    attention_column_sums(q [B, H, S, D], k [B, Hk, N, D], scale, causal, key_valid [B, Hk, N] bool,
                          query_valid [B, S] bool, query_weight [B, S] fp32, lse [B, H, S] fp32, tile)
        -> colsum [B, Hk, N] fp32 = sum over queries i of w_i * mean over the G heads of hk of
           exp(scale * q[b, h, i] . k[b, hk, j] - lse[b, h, i]) over allowed (i, j), 0 elsewhere

Query i of a prefill sits at key position ``N - S + i`` (the keys end with the S new tokens); it may
read key j iff ``key_valid[b, hk, j]`` and, when causal, ``j <= N - S + i``. ``w_i`` is
``query_valid[b, i]`` (0 for a padding query) times ``query_weight[b, i]`` (1 when None). ``lse`` is
each row's log-sum-exp over its allowed keys (as an attention kernel returns it); None computes it.
A row with no allowed key, or with weight 0, contributes 0. Logits, softmax and sums are fp32.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .dispatch import HAS_TRITON, register_op

__all__ = ["decode_attention_probs", "decode_attention_probs_reference", "attention_column_sums",
           "attention_column_sums_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _describe(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_qkv(name, q, k, v, q_dims, scale, key_valid, extra=()) -> None:
    """Shared checks: q [B, H, (S,) D] and k (= v) [B, Hk, N, D] of one float dtype, H a multiple of
    Hk, key_valid bool [B, Hk, N] or None, one device, a numeric scale."""
    for label, t in (("q", q), ("k", k)) + ((("v", v),) if v is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
    q_shape = "[B, H, D]" if q_dims == 3 else "[B, H, S, D]"
    if q.dim() != q_dims or k.dim() != 4 or (v is not None and v.shape != k.shape):
        got = ", ".join(str(tuple(t.shape)) for t in (q, k, v) if t is not None)
        raise ValueError(f"{name}: expected q {q_shape}, k{' = v' if v is not None else ''} [B, Hk, N, D]; got {got}")
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    if k.shape[0] != B or k.shape[3] != D or k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(f"{name}: q {tuple(q.shape)} does not match k {tuple(k.shape)} "
                         "(same B and D; H must be a multiple of Hk)")
    dtypes = [t.dtype for t in (q, k, v) if t is not None]
    if len(set(dtypes)) != 1 or dtypes[0] not in _DTYPES:
        raise ValueError(f"{name}: q, k{', v' if v is not None else ''} must share one of fp16/bf16/fp32, "
                         f"got {', '.join(map(str, dtypes))}")
    if key_valid is not None and (not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool
                                  or key_valid.shape != k.shape[:3]):
        raise ValueError(f"{name}: key_valid must be bool {tuple(k.shape[:3])} [B, Hk, N] or None, "
                         f"got {_describe(key_valid)}")
    tensors = [t for t in (q, k, v, key_valid) + tuple(extra) if t is not None]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{name}: scale must be a finite number, got {scale!r}")


def check_decode_attention_probs_inputs(q, k, v, scale, key_valid=None) -> None:
    """Raise ValueError naming what is wrong with the inputs of :func:`decode_attention_probs`."""
    _check_qkv("decode_attention_probs", q, k, v, 3, scale, key_valid)
    if k.shape[2] == 0:
        raise ValueError("decode_attention_probs: needs at least one key (N >= 1)")


def check_attention_column_sums_inputs(q, k, scale, key_valid=None, query_valid=None, query_weight=None,
                                       lse=None, tile=256) -> None:
    """Raise ValueError naming what is wrong with the inputs of :func:`attention_column_sums`."""
    name = "attention_column_sums"
    extra = tuple(t for t in (query_valid, query_weight, lse) if isinstance(t, torch.Tensor))
    _check_qkv(name, q, k, None, 4, scale, key_valid, extra)
    B, H, S = q.shape[:3]
    if S > k.shape[2]:
        raise ValueError(f"{name}: the S={S} queries must be the last of the N={k.shape[2]} keys (S <= N)")
    for label, t, dtype, shape in (("query_valid", query_valid, torch.bool, (B, S)),
                                   ("query_weight", query_weight, torch.float32, (B, S)),
                                   ("lse", lse, torch.float32, (B, H, S))):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape):
            raise ValueError(f"{name}: {label} must be {str(dtype).replace('torch.', '')} {shape} or None, "
                             f"got {_describe(t)}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"{name}: tile must be a positive int, got {tile!r}")


def decode_attention_probs_reference(q, k, v, scale, key_valid=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`decode_attention_probs` (also the CPU implementation): one
    [G, D] x [D, N] product per KV head, fp32 softmax."""
    B, H, D = q.shape
    Hk = k.shape[1]
    logits = torch.matmul(q.float().reshape(B, Hk, H // Hk, D), k.float().transpose(-1, -2)).mul_(scale)
    if key_valid is not None:
        logits.masked_fill_(~key_valid[:, :, None, :], float("-inf"))
    p = logits.softmax(-1)  # [B, Hk, G, N]
    out = torch.matmul(p, v.float()).view(B, H, D).to(q.dtype)
    return out, p.mean(2)


def query_weights(query_valid, query_weight) -> Optional[torch.Tensor]:
    """w [B, S] fp32 (query_valid times query_weight), None when both are None."""
    if query_valid is None:
        return query_weight
    w = query_valid.to(torch.float32)
    return w if query_weight is None else w * query_weight


def attention_column_sums_reference(q, k, scale, *, causal: bool = True, key_valid=None, query_valid=None,
                                    query_weight=None, lse=None, tile: int = 256) -> torch.Tensor:
    """Torch reference of :func:`attention_column_sums` (also the CPU implementation): query tiles
    of ``tile`` rows, each a grouped [G * tile, D] x [D, N'] product over the N' keys it can see
    (memory O(H * tile * N)), one exp per logit, and the weighted row sum as a mat-vec."""
    B, H, S, D = q.shape
    Hk, N = k.shape[1], k.shape[2]
    G = H // Hk
    out = torch.zeros(B, Hk, N, dtype=torch.float32, device=q.device)
    kf = k.float()
    w = query_weights(query_valid, query_weight)
    hidden = None if key_valid is None else ~key_valid[:, :, None, :]
    for a in range(0, S, tile):
        e = min(S, a + tile)
        T = e - a
        hi = N - S + e if causal else N  # keys after the tile's last query are unseen
        qt = (q[:, :, a:e].float() * scale).reshape(B, Hk, G * T, D)  # not in place: .float() may be q
        s = torch.matmul(qt, kf[:, :, :hi].transpose(-1, -2))  # [B, Hk, G * T, hi] logits
        if hidden is not None:
            s.masked_fill_(hidden[..., :hi], float("-inf"))
        if causal:  # only the last T keys come after some query of the tile
            future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
            s.view(B, Hk, G, T, hi)[..., hi - T:].masked_fill_(future, float("-inf"))
        if lse is None:  # p = exp(s - max) / sum: the row sum is the softmax denominator
            m = s.amax(-1, keepdim=True)
            s.sub_(m.masked_fill_(m == float("-inf"), 0.0)).exp_()  # a row with no allowed key: all 0
            rw = s.sum(-1, keepdim=True)
            rw = torch.where(rw > 0, rw.reciprocal(), 0.0)
        else:
            l = lse[:, :, a:e].reshape(B, Hk, G * T, 1)
            drop = ~(l > float("-inf"))  # no allowed key (or a NaN lse): exp(s - inf) = 0
            if w is not None:  # rows of weight 0 too, whatever their lse
                drop = drop | (w[:, None, a:e] == 0).repeat(1, 1, G).view(B, 1, G * T, 1)
            s.sub_(l.masked_fill(drop, float("inf"))).exp_()
            rw = None
        if w is not None:
            wt = w[:, None, a:e].repeat(1, 1, G).view(B, 1, G * T, 1)
            rw = wt if rw is None else rw * wt
        if rw is None:
            out[:, :, :hi] += s.sum(2)
        else:
            out[:, :, :hi] += torch.matmul(rw.transpose(-1, -2), s).squeeze(-2)
    return out.div_(G)


if HAS_TRITON:
    from ._eviction_triton import attention_column_sums_triton, decode_attention_probs_triton
else:  # pragma: no cover - depends on the environment
    attention_column_sums_triton = decode_attention_probs_triton = None

_DECODE = register_op("decode_attention_probs", decode_attention_probs_reference, decode_attention_probs_triton)
_COLSUM = register_op("attention_column_sums", attention_column_sums_reference, attention_column_sums_triton)


def decode_attention_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           key_valid: Optional[torch.Tensor] = None, *,
                           backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode attention and its key probabilities: ``(out [B, H, D] in q's dtype, probs [B, Hk, N]
    fp32)`` (see the module docstring). Every (b, hk) needs at least one valid key.

    ``backend``: ``"torch"``, ``"triton"`` or None (automatic). The Triton path is a split-K flash
    decode that keeps the raw logits ([B, H, N] fp32 scratch) and turns them into probabilities
    once the per-head log-sum-exp is known; no host synchronisation.
    """
    check_decode_attention_probs_inputs(q, k, v, scale, key_valid)
    return _DECODE(q, k, v, float(scale), key_valid, backend=backend)


def attention_column_sums(q: torch.Tensor, k: torch.Tensor, scale: float, *, causal: bool = True,
                          key_valid: Optional[torch.Tensor] = None, query_valid: Optional[torch.Tensor] = None,
                          query_weight: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
                          tile: int = 256, backend: Optional[str] = None) -> torch.Tensor:
    """Attention probability each key receives from S prefill queries, summed over the queries and
    averaged over each KV head's G query heads: ``[B, Hk, N]`` fp32 (see the module docstring).

    ``tile`` bounds the torch path's memory (query rows per step). ``backend``: ``"torch"``,
    ``"triton"`` or None (automatic). The Triton path computes the row lse when not given (flash
    style, no V), then one program per (key tile, KV head, batch row) loops over the G heads and the
    query tiles that can see its keys; no S x N matrix is stored and no atomics are used.
    """
    check_attention_column_sums_inputs(q, k, scale, key_valid, query_valid, query_weight, lse, tile)
    return _COLSUM(q, k, float(scale), causal=bool(causal), key_valid=key_valid, query_valid=query_valid,
                   query_weight=query_weight, lse=lse, tile=tile, backend=backend)
