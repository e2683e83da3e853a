"""Block index ops for hierarchical selection (HISA, Quest; docs/methods.md §1.2, §1.4).

The cache is cut into blocks (HISA) or pages (Quest) of ``T`` consecutive tokens. Shapes
(notation of docs/methods.md): ``B`` batch, ``R`` score rows (query heads, or heads x queries; row
``r`` reads KV head ``r // (R // Hk)``), ``Hk`` KV heads, ``N`` tokens, ``D`` head dim,
``nb`` blocks, ``M`` chosen blocks.

    block_summaries(keys [B, Hk, N, D], valid [B, N] | None, T, first_block)
        -> mean [B, Hk, nb, D] fp32, kmax / kmin [B, Hk, nb, D] (keys' dtype), count [B, nb] int32
        for blocks first_block .. ceil(N / T) - 1, over the valid tokens only (an empty block:
        mean, kmax, kmin 0 and count 0). Re-summarising only the blocks that received tokens is
        what makes the index incremental.
    block_bound_scores(q [B, R, D], kmax, kmin [B, Hk, nb, D], scale) -> [B, R, nb] fp32
        scale * sum_d max(q_d * kmax_d, q_d * kmin_d): an upper bound of scale * q . k for every
        key k of the block (Quest's bound).
    block_token_scores(q [B, R, D], keys [B, Hk, N, D], blocks [B, M] long, T, scale)
        -> [B, R, M * T] fp32: scale * q . k of every token of the chosen blocks (column
        j * T + i is token blocks[:, j] * T + i), -inf for tokens at or beyond N.

Block scoring with the mean key is ``grouped_scores(q, mean)`` (the mean logit of the block).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .dispatch import HAS_TRITON, register_op
from .grouped_scores import grouped_scores_reference
from .indexed_attention import gather_rows

__all__ = ["block_summaries", "block_summaries_reference", "block_bound_scores", "block_bound_scores_reference",
           "block_token_scores", "block_token_scores_reference"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_keys(name: str, keys: torch.Tensor) -> None:
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"{name}: keys must be a torch.Tensor, got {type(keys).__name__}")
    if keys.dim() != 4 or keys.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: keys must be [B, Hk, N, D] fp16/bf16/fp32, got {keys.dtype} {tuple(keys.shape)}")


def _check_block(name: str, block) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ValueError(f"{name}: block size must be a positive integer, got {block!r}")


def _check_rows(name: str, q: torch.Tensor, hk: int, d: int) -> None:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{name}: q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 3 or q.shape[-1] != d:
        raise ValueError(f"{name}: q must be [B, R, D={d}], got {tuple(q.shape)}")
    if q.shape[1] == 0 or q.shape[1] % hk:
        raise ValueError(f"{name}: rows R={q.shape[1]} must be a positive multiple of KV heads Hk={hk}")


# ------------------------------------------------------------------------------ summaries


def block_summaries_reference(keys: torch.Tensor, valid: Optional[torch.Tensor], block: int, first_block: int = 0
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`block_summaries`: one padded [B, Hk, nb, T, D] view, three reductions."""
    B, Hk, N, D = keys.shape
    start = first_block * block
    nb = max(-(-N // block) - first_block, 0)
    span = keys[:, :, start:]
    pad = nb * block - span.shape[2]
    ok = torch.ones(B, span.shape[2], dtype=torch.bool, device=keys.device) if valid is None else valid[:, start:N]
    ok = torch.nn.functional.pad(ok, (0, pad)).view(B, 1, nb, block, 1)
    tiles = torch.nn.functional.pad(span, (0, 0, 0, pad)).view(B, Hk, nb, block, D)
    count = ok.view(B, nb, block).sum(-1, dtype=torch.int32)
    mean = tiles.float().masked_fill(~ok, 0.0).sum(3) / count.clamp_min(1)[:, None, :, None]
    empty = (count == 0)[:, None, :, None]
    kmax = tiles.masked_fill(~ok, float("-inf")).amax(3).masked_fill(empty, 0.0)
    kmin = tiles.masked_fill(~ok, float("inf")).amin(3).masked_fill(empty, 0.0)
    return mean, kmax, kmin, count


def check_block_summaries_inputs(keys, valid, block, first_block) -> None:
    name = "block_summaries"
    _check_keys(name, keys)
    _check_block(name, block)
    if isinstance(first_block, bool) or not isinstance(first_block, int) or first_block < 0:
        raise ValueError(f"{name}: first_block must be an integer >= 0, got {first_block!r}")
    if valid is not None and (not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool
                              or tuple(valid.shape) != (keys.shape[0], keys.shape[2])):
        raise ValueError(f"{name}: valid must be None or bool [B, N] = {(keys.shape[0], keys.shape[2])}")


# ------------------------------------------------------------------------------ bound scores


def block_bound_scores_reference(q: torch.Tensor, kmax: torch.Tensor, kmin: torch.Tensor, scale: float = 1.0
                                 ) -> torch.Tensor:
    """Torch reference of :func:`block_bound_scores`: max(q_d a, q_d b) = q_d^+ a + q_d^- b for
    a >= b, so the bound is two grouped products, no [B, R, nb, D] temporary."""
    qf = q.float()
    out = grouped_scores_reference(qf.clamp(min=0), kmax.float())
    out += grouped_scores_reference(qf.clamp(max=0), kmin.float())
    return out.mul_(float(scale))


def check_block_bound_inputs(q, kmax, kmin) -> None:
    name = "block_bound_scores"
    _check_keys(name, kmax)
    if not isinstance(kmin, torch.Tensor) or kmin.shape != kmax.shape or kmin.dtype != kmax.dtype:
        raise ValueError(f"{name}: kmin must match kmax {kmax.dtype} {tuple(kmax.shape)}")
    _check_rows(name, q, kmax.shape[1], kmax.shape[3])
    if q.shape[0] != kmax.shape[0] or q.device != kmax.device or kmin.device != kmax.device:
        raise ValueError(f"{name}: q, kmax, kmin must share batch size and device")


# ------------------------------------------------------------------------------ token scores


def block_token_rows(blocks: torch.Tensor, block: int) -> torch.Tensor:
    """[B, M] block ids -> [B, M * T] token positions, block by block."""
    return (blocks[:, :, None] * block + torch.arange(block, device=blocks.device)).flatten(1)


def block_token_scores_reference(q: torch.Tensor, keys: torch.Tensor, blocks: torch.Tensor, block: int,
                                 scale: float = 1.0) -> torch.Tensor:
    """Torch reference of :func:`block_token_scores`: gathers the chosen blocks' keys
    ([B, Hk, M * T, D], the part of the cache read) and scores them like ``grouped_scores``."""
    N = keys.shape[2]
    rows = block_token_rows(blocks, block)
    inside = rows < N
    gathered = gather_rows(keys, rows.clamp(0, max(N - 1, 0)))  # one index_select over cache rows
    out = grouped_scores_reference(q.to(keys.dtype), gathered, float(scale))
    return out.masked_fill_(~inside[:, None], float("-inf"))


def check_block_token_inputs(q, keys, blocks, block) -> None:
    name = "block_token_scores"
    _check_keys(name, keys)
    _check_block(name, block)
    _check_rows(name, q, keys.shape[1], keys.shape[3])
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.long or blocks.dim() != 2 \
            or blocks.shape[0] != keys.shape[0]:
        raise ValueError(f"{name}: blocks must be long [B, M], got {getattr(blocks, 'dtype', None)} "
                         f"{tuple(getattr(blocks, 'shape', ()))}")
    if q.shape[0] != keys.shape[0] or q.device != keys.device or blocks.device != keys.device:
        raise ValueError(f"{name}: q, keys, blocks must share batch size and device")


# ------------------------------------------------------------------------------ dispatch

if HAS_TRITON:
    from ._block_index_triton import block_bound_scores_triton, block_summaries_triton, block_token_scores_triton
else:  # pragma: no cover - depends on the environment
    block_summaries_triton = block_bound_scores_triton = block_token_scores_triton = None

_SUMMARIES = register_op("block_summaries", block_summaries_reference, block_summaries_triton)
_BOUND = register_op("block_bound_scores", block_bound_scores_reference, block_bound_scores_triton)
_TOKENS = register_op("block_token_scores", block_token_scores_reference, block_token_scores_triton)


def block_summaries(keys: torch.Tensor, valid: Optional[torch.Tensor], block: int, first_block: int = 0, *,
                    backend: Optional[str] = None):
    """Per-block mean (fp32), elementwise max / min (keys' dtype) and valid-token count (int32) of
    blocks first_block.. of keys [B, Hk, N, D]; see the module docstring."""
    check_block_summaries_inputs(keys, valid, block, first_block)
    return _SUMMARIES(keys, valid, block, first_block, backend=backend)


def block_bound_scores(q: torch.Tensor, kmax: torch.Tensor, kmin: torch.Tensor, scale: float = 1.0, *,
                       backend: Optional[str] = None) -> torch.Tensor:
    """[B, R, nb] fp32 upper bounds of scale * q . k over each block (Quest); see the module docstring."""
    check_block_bound_inputs(q, kmax, kmin)
    return _BOUND(q, kmax, kmin, float(scale), backend=backend)


def block_token_scores(q: torch.Tensor, keys: torch.Tensor, blocks: torch.Tensor, block: int, scale: float = 1.0,
                       *, backend: Optional[str] = None) -> torch.Tensor:
    """[B, R, M * T] fp32 logits of the tokens of the chosen blocks only; see the module docstring."""
    check_block_token_inputs(q, keys, blocks, block)
    return _TOKENS(q, keys, blocks, block, float(scale), backend=backend)
