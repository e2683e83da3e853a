"""Grouped QK scoring: the logits of every query head against its (shared) KV head.

Shapes (notation of docs/methods.md): ``B`` batch, ``H`` query heads, ``Hk`` KV heads,
``G = H // Hk``, ``N`` cached tokens, ``D`` head dim.

    q       [B, H, D]        one query per head (decode, or a chunk's mean query)
    k       [B, Hk, N, D]    the KV-cache layout, NOT repeated for GQA
    scores  [B, H, N] fp32   scores[b, h, t] = q[b, h] . k[b, h // G, t]  (* scale)

Query head ``h`` reads KV head ``h // G`` (the order of HF ``repeat_kv``).
Accumulation is fp32 for every input dtype.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from .dispatch import HAS_TRITON, register_op

__all__ = ["grouped_scores", "grouped_scores_reference", "check_grouped_scores_inputs"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_grouped_scores_inputs(q: torch.Tensor, k: torch.Tensor, scale=None) -> None:
    """Raise ValueError (TypeError for non-tensors) naming what is wrong with ``q`` / ``k`` / ``scale``."""
    name = "grouped_scores"
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise TypeError(f"{name}: q and k must be torch.Tensors, got {type(q).__name__} and {type(k).__name__}")
    if q.dim() != 3:
        raise ValueError(f"{name}: q must have rank 3 [B, H, D], got shape {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"{name}: k must have rank 4 [B, Hk, N, D], got shape {tuple(k.shape)}")
    B, H, D = q.shape
    Bk, Hk, N, Dk = k.shape
    if B != Bk:
        raise ValueError(f"{name}: batch mismatch: q has B={B}, k has B={Bk}")
    if D != Dk:
        raise ValueError(f"{name}: head dim mismatch: q has D={D}, k has D={Dk}")
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"{name}: query heads H={H} must be a positive multiple of KV heads Hk={Hk}")
    if q.dtype != k.dtype:
        raise ValueError(f"{name}: dtype mismatch: q is {q.dtype}, k is {k.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: unsupported dtype {q.dtype}; supported: {SUPPORTED_DTYPES}")
    if q.device != k.device:
        raise ValueError(f"{name}: device mismatch: q is on {q.device}, k is on {k.device}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise ValueError(f"{name}: scale must be None or a real number, got {scale!r}")


# Tokens per matmul of the torch path for half-precision keys: each tile is upcast to fp32 on its
# own (CPU matmul has no fp32-output half matmul), so no full-length fp32 copy of K is written per
# call; that copy cost more than the product itself. Measured on the 2-core CPU
# (`python benchmarks/score_tiles.py`, 1 and 2 threads): bf16 keys 1.3-6.6x faster at 32K-128K on
# the SmolLM2, Gemma-3 and Llama-3-8B decode shapes. fp32 keys stay one matmul: tiling them gains
# at most 1.4x with 1 thread and loses up to 2x with 2 (MKL threads one large product better).
SCORE_TILE = 4096


def grouped_scores_reference(q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Torch reference of :func:`grouped_scores` (also the CPU implementation).

    q [B, H, D], k [B, Hk, N, D] -> [B, H, N] fp32: q viewed as [B, Hk, G, D] times k^T, K never
    repeated per query head; half-precision keys in tiles of SCORE_TILE tokens, each upcast to fp32.
    """
    B, H, D = q.shape
    _, Hk, N, _ = k.shape
    G = H // Hk
    qg = q.reshape(B, Hk, G, D).to(torch.float32)
    if N <= SCORE_TILE or k.dtype == torch.float32:
        scores = torch.matmul(qg, k.to(torch.float32).transpose(-1, -2))  # [B, Hk, G, N]
    else:
        scores = qg.new_empty(B, Hk, G, N)
        for a in range(0, N, SCORE_TILE):
            b = min(a + SCORE_TILE, N)
            torch.matmul(qg, k[:, :, a:b].to(torch.float32).transpose(-1, -2), out=scores[..., a:b])
    if scale is not None:
        scores.mul_(float(scale))
    return scores.reshape(B, H, N)


if HAS_TRITON:
    from ._grouped_scores_triton import grouped_scores_triton as _triton_launcher
else:  # pragma: no cover - depends on the environment
    _triton_launcher = None

_OP = register_op("grouped_scores", grouped_scores_reference, _triton_launcher)


def grouped_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: Optional[float] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Logits of every query head against the keys of its KV head.

    Args:
        q: ``[B, H, D]`` fp16/bf16/fp32, last dim contiguous.
        k: ``[B, Hk, N, D]`` same dtype and device, ``H % Hk == 0``, last dim contiguous
            (other strides are free, e.g. a slice of a larger cache).
        scale: optional factor applied to the fp32 logits.
        backend: ``"torch"``, ``"triton"`` or None (automatic, see ``tokaccel.kernels.dispatch``).

    Returns:
        ``[B, H, N]`` fp32 with ``out[b, h, t] = scale * q[b, h] . k[b, h // (H // Hk), t]``.
    """
    check_grouped_scores_inputs(q, k, scale)
    return _OP(q, k, scale, backend=backend)
