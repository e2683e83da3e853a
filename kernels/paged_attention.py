"""Decode attention and key scores that read K/V through vLLM's block tables (its CUDA cache layout).

Shapes: ``B`` sequences, ``H`` query heads, ``Hk`` KV heads (``G = H // Hk``; query head ``h``
reads KV head ``h // G``), ``D`` head dim, ``NB`` cache blocks of ``BS`` tokens, ``M`` block-table
columns, ``L`` selected tokens per sequence.

    q            [B, H, D]            one query per head
    key_cache    [NB, BS, Hk, D]      vLLM's CUDA (Triton / FlashAttention backends) cache of one layer:
    value_cache  [NB, BS, Hk, D]      ``kv_cache.transpose(1, 2).split(D, dim=-1)``, strided views with
                                      last-dim stride 1 (other strides arbitrary; never copied)
    block_table  [B, M] int32         token t of sequence b is row ``t % BS`` of block
                                      ``block_table[b, t // BS]`` (int64 is accepted too)
    idx          [B, L] int64         token positions to read, any order; entries where ``valid`` is
                                      False are ignored (any value); valid ones must be < M * BS
    valid        [B, L] bool
    lengths      [B] int32 / int64    tokens of each sequence (<= M * BS)

:func:`paged_indexed_attention` -> ``[B, H, D]`` in q's dtype: softmax(scale * q . k^T) v over the
tokens ``idx[b][valid[b]]`` (logits, softmax and accumulation in fp32; a row with no valid entry
gives 0). :func:`paged_key_scores` -> ``[B, H, N]`` fp32, ``N = max(lengths)``: the raw dot products
``q[b, h] . k_t`` (no scale) for every token ``t < lengths[b]``, ``-inf`` beyond. Block-table entries
past a sequence's last block are never read (vLLM leaves stale values there).
"""
from __future__ import annotations

from typing import Optional

import torch

from .dispatch import HAS_TRITON, register_op
from .grouped_scores import grouped_scores_reference

__all__ = ["paged_indexed_attention", "paged_indexed_attention_reference", "paged_key_scores",
           "paged_key_scores_reference", "check_paged_attention_inputs", "check_paged_key_scores_inputs",
           "paged_rows"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TABLE_DTYPES = (torch.int32, torch.long)


def _check_cache(name, q, caches, block_table) -> None:
    for label, t in (("q", q),) + tuple(caches) + (("block_table", block_table),):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3 or any(c.dim() != 4 for _, c in caches):
        raise ValueError(f"{name}: expected q [B, H, D] and caches [num_blocks, block_size, Hk, D]; got q "
                         f"{tuple(q.shape)}, " + ", ".join(f"{lb} {tuple(c.shape)}" for lb, c in caches))
    B, H, D = q.shape
    shape = caches[0][1].shape
    if any(c.shape != shape for _, c in caches):
        raise ValueError(f"{name}: key_cache and value_cache shapes differ: "
                         + ", ".join(f"{tuple(c.shape)}" for _, c in caches))
    Hk = shape[2]
    if shape[3] != D or Hk == 0 or H % Hk:
        raise ValueError(f"{name}: q {tuple(q.shape)} does not match the cache {tuple(shape)} "
                         "(same D; H must be a multiple of Hk)")
    if any(c.dtype != q.dtype for _, c in caches) or q.dtype not in _DTYPES:
        raise ValueError(f"{name}: q and the caches must share one of fp16/bf16/fp32, got "
                         f"{q.dtype}, " + ", ".join(str(c.dtype) for _, c in caches))
    if any(c.stride(-1) != 1 and D > 1 for _, c in caches):
        raise ValueError(f"{name}: the caches' last dim must have stride 1 (vLLM's layout), got strides "
                         + ", ".join(f"{c.stride()}" for _, c in caches))
    if block_table.dim() != 2 or block_table.shape[0] != B or block_table.dtype not in _TABLE_DTYPES:
        raise ValueError(f"{name}: block_table must be int32 [B={B}, M], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")


def _check_devices(name, *tensors) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")


def check_paged_attention_inputs(q, key_cache, value_cache, block_table, idx, valid, scale) -> None:
    """Raise ValueError (TypeError for non-tensors) naming what is wrong with the inputs."""
    name = "paged_indexed_attention"
    _check_cache(name, q, (("key_cache", key_cache), ("value_cache", value_cache)), block_table)
    for label, t in (("idx", idx), ("valid", valid)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
    B = q.shape[0]
    if idx.dim() != 2 or idx.shape[0] != B or idx.dtype != torch.long:
        raise ValueError(f"{name}: idx must be int64 [B={B}, L], got {idx.dtype} {tuple(idx.shape)}")
    if valid.shape != idx.shape or valid.dtype != torch.bool:
        raise ValueError(f"{name}: valid must be bool {tuple(idx.shape)}, got {valid.dtype} {tuple(valid.shape)}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"{name}: scale must be a number, got {scale!r}")
    _check_devices(name, q, key_cache, value_cache, block_table, idx, valid)


def check_paged_key_scores_inputs(q, key_cache, block_table, lengths) -> None:
    """Raise ValueError (TypeError for non-tensors) naming what is wrong with the inputs."""
    name = "paged_key_scores"
    _check_cache(name, q, (("key_cache", key_cache),), block_table)
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name}: lengths must be a torch.Tensor, got {type(lengths).__name__}")
    B = q.shape[0]
    if tuple(lengths.shape) != (B,) or lengths.dtype not in _TABLE_DTYPES:
        raise ValueError(f"{name}: lengths must be an integer [B={B}] tensor, got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    _check_devices(name, q, key_cache, block_table, lengths)


def paged_rows(cache: torch.Tensor, block_table: torch.Tensor, pos: torch.Tensor,
               live: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows of cache [NB, BS, Hk, D] at token positions pos [B, L] (int64) of each sequence ->
    [B, L, Hk, D] (only those rows are copied). Where live [B, L] is False the position and its
    block-table entry are not used (row 0 of block 0 is read instead)."""
    bs = cache.shape[1]
    if live is not None:
        pos = pos.masked_fill(~live, 0)
    blocks = block_table.gather(1, pos // bs).long()
    if live is not None:
        blocks = blocks.masked_fill(~live, 0)
    return cache[blocks, pos % bs]


def paged_indexed_attention_reference(q, key_cache, value_cache, block_table, idx, valid, scale) -> torch.Tensor:
    """Torch reference of :func:`paged_indexed_attention` (also the CPU implementation): gathers the
    L rows once, one fp32 [G, D] x [D, L] product per KV head (K is never repeated)."""
    B, H, D = q.shape
    Hk = key_cache.shape[2]
    ks = paged_rows(key_cache, block_table, idx, valid).permute(0, 2, 3, 1).float()  # [B, Hk, D, L]
    vs = paged_rows(value_cache, block_table, idx, valid).transpose(1, 2).float()    # [B, Hk, L, D]
    scores = torch.matmul(q.reshape(B, Hk, H // Hk, D).float(), ks).mul_(scale)     # [B, Hk, G, L]
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1).nan_to_num_(0.0)  # a row without valid entries gives 0
    return torch.matmul(probs, vs).reshape(B, H, D).to(q.dtype)


def _max_len(lengths: torch.Tensor, max_len: Optional[int]) -> int:
    if max_len is not None:
        return int(max_len)
    return int(lengths.max()) if lengths.numel() else 0


def paged_key_scores_reference(q, key_cache, block_table, lengths, max_len: Optional[int] = None) -> torch.Tensor:
    """Torch reference of :func:`paged_key_scores` (also the CPU implementation): gathers the
    sequences' blocks (whole blocks, stale table entries replaced by block 0), then fp32 grouped
    scores (:func:`grouped_scores_reference`, K never repeated), -inf past each length."""
    B, H, _ = q.shape
    N = _max_len(lengths, max_len)
    bs = key_cache.shape[1]
    nb = -(-N // bs)
    lengths = lengths.long()
    first = torch.arange(nb, device=q.device) * bs  # first token of each block-table column
    blocks = block_table[:, :nb].long().masked_fill(first[None] >= lengths[:, None], 0)
    keys = key_cache[blocks].flatten(1, 2)[:, :N]  # [B, N, Hk, D]
    scores = grouped_scores_reference(q, keys.transpose(1, 2))  # [B, H, N] fp32
    dead = torch.arange(N, device=q.device)[None] >= lengths[:, None]
    return scores.masked_fill_(dead[:, None, :], float("-inf"))


if HAS_TRITON:
    from ._paged_attention_triton import paged_indexed_attention_triton as _triton_launcher
    from ._paged_attention_triton import paged_key_scores_triton as _scores_launcher
else:  # pragma: no cover - depends on the environment
    _triton_launcher = _scores_launcher = None

_OP = register_op("paged_indexed_attention", paged_indexed_attention_reference, _triton_launcher)
_SCORES_OP = register_op("paged_key_scores", paged_key_scores_reference, _scores_launcher)


def paged_indexed_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    idx: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention of one query per head over the tokens ``idx[b][valid[b]]`` of each sequence, read
    through the block table (see the module docstring) -> ``[B, H, D]`` in q's dtype.

    ``backend``: ``"torch"``, ``"triton"`` or None (automatic: Triton for CUDA tensors). The Triton
    kernel runs one program per (sequence, KV head) serving the G query heads of the group, with an
    online softmax over tiles of the L entries.
    """
    check_paged_attention_inputs(q, key_cache, value_cache, block_table, idx, valid, scale)
    return _OP(q, key_cache, value_cache, block_table, idx, valid, float(scale), backend=backend)


def paged_key_scores(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    *,
    max_len: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Raw logits ``q[b, h] . k_t`` (no scale) of every cached token of each sequence, read through
    the block table -> ``[B, H, N]`` fp32 with ``N = max(lengths)``, ``-inf`` at ``t >= lengths[b]``.

    ``max_len`` (optional, >= max(lengths)) sets N without reading ``lengths`` on the host (no
    device sync). ``backend``: ``"torch"``, ``"triton"`` or None (automatic: Triton for CUDA tensors).
    """
    check_paged_key_scores_inputs(q, key_cache, block_table, lengths)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0):
        raise ValueError(f"paged_key_scores: max_len must be a non-negative int or None, got {max_len!r}")
    N = _max_len(lengths, max_len)
    capacity = block_table.shape[1] * key_cache.shape[1]
    if N > capacity:
        raise ValueError(f"paged_key_scores: {N} tokens do not fit the block table ({block_table.shape[1]} "
                         f"blocks of {key_cache.shape[1]} = {capacity} tokens)")
    return _SCORES_OP(q, key_cache, block_table, lengths, N, backend=backend)
