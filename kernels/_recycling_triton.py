"""Triton kernels for :mod:`tokaccel.kernels.recycling` (imported only when triton is).

``tree_draft``: one program per tree; level by level, every node of the level reads its parent's
token from the output row and gathers ``table[parent token, slot]`` (a barrier between levels).
``adjacency_update``: one program per node; S passes over the logits row, each finding the next
best (value, then lowest id) below the previous one, so no sort and no host sync.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton.language as tl

from .dispatch import AotConfig, register_kernel

DRAFT_BLOCK = 128  # nodes per tree (the paper's tree has 81 with its root)
TOPK_BLOCK_V = 1024


def _draft_aot_configs() -> List[AotConfig]:
    signature = {"Table": "*i32", "Roots": "*i64", "Parent": "*i64", "Slot": "*i64", "Depth": "*i64",
                 "Out": "*i64", "N": "i32", "S": "i32", "MAX_DEPTH": "i32", "BLOCK": "constexpr"}
    return [AotConfig(name=f"block{DRAFT_BLOCK}", signature=signature, constexprs={"BLOCK": DRAFT_BLOCK},
                      options={"num_warps": 1, "num_stages": 1})]


@register_kernel(_draft_aot_configs, name="tree_draft")
def _draft_kernel(Table, Roots, Parent, Slot, Depth, Out, N, S, MAX_DEPTH, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    parent = tl.load(Parent + offs, mask=mask, other=0)
    slot = tl.load(Slot + offs, mask=mask, other=0)
    depth = tl.load(Depth + offs, mask=mask, other=-1)
    row = Out + b.to(tl.int64) * N
    root = tl.load(Roots + b)
    tl.store(row + offs, tl.zeros([BLOCK], tl.int64) + root, mask=mask)
    for d in range(1, MAX_DEPTH + 1):
        tl.debug_barrier()
        level = mask & (depth == d)
        parent_token = tl.load(row + parent, mask=level, other=0)
        token = tl.load(Table + parent_token * S + slot, mask=level, other=0)
        tl.store(row + offs, token.to(tl.int64), mask=level)


def tree_draft_triton(table, roots, parent, slot, depth, max_depth: Optional[int] = None) -> torch.Tensor:
    n = parent.shape[0]
    if n > DRAFT_BLOCK:
        raise ValueError(f"tree_draft (triton): at most {DRAFT_BLOCK} nodes per tree, got {n}")
    max_depth = int(depth.max()) if max_depth is None else max_depth
    out = torch.empty(roots.shape[0], n, dtype=torch.long, device=table.device)
    _draft_kernel[(roots.shape[0],)](table, roots.contiguous(), parent.contiguous(), slot.contiguous(),
                                     depth.contiguous(), out, n, table.shape[1], max_depth,
                                     BLOCK=DRAFT_BLOCK, num_warps=1)
    return out


def _topk_aot_configs() -> List[AotConfig]:
    signature = {"Table": "*i32", "Tokens": "*i64", "Logits": "*fp32", "Write": "*i1", "V": "i32",
                 "stride_l": "i32", "K": "constexpr", "BLOCK_V": "constexpr"}
    return [AotConfig(name=f"k8_v{TOPK_BLOCK_V}", signature=signature, constexprs={"K": 8, "BLOCK_V": TOPK_BLOCK_V},
                      attrs={(2,): [["tt.divisibility", 16]]}, options={"num_warps": 4, "num_stages": 1})]


@register_kernel(_topk_aot_configs, name="adjacency_update")
def _topk_kernel(Table, Tokens, Logits, Write, V, stride_l, K: tl.constexpr, BLOCK_V: tl.constexpr):
    i = tl.program_id(0)
    write = tl.load(Write + i)
    if write:
        token = tl.load(Tokens + i)
        base = Logits + i.to(tl.int64) * stride_l
        offs = tl.arange(0, BLOCK_V)
        prev_v = float("inf")
        prev_i = -1
        for k in range(K):
            best_v = float("-inf")
            best_i = V
            for v0 in range(0, V, BLOCK_V):
                ids = v0 + offs
                x = tl.load(base + ids, mask=ids < V, other=float("-inf"))
                after = (ids < V) & ((x < prev_v) | ((x == prev_v) & (ids > prev_i)))
                xm = tl.where(after, x, float("-inf"))
                m = tl.max(xm, axis=0)
                mi = tl.min(tl.where(after & (xm == m), ids, V), axis=0)
                better = (m > best_v) | ((m == best_v) & (mi < best_i))
                best_v = tl.where(better, m, best_v)
                best_i = tl.where(better, mi, best_i)
            tl.store(Table + token * K + k, best_i.to(tl.int32))
            prev_v = best_v
            prev_i = best_i


def adjacency_update_triton(table, tokens, logits, write) -> None:
    n, V = logits.shape
    if n == 0:
        return
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    _topk_kernel[(n,)](table, tokens.contiguous(), logits, write.contiguous(), V, logits.stride(0),
                       K=table.shape[1], BLOCK_V=TOPK_BLOCK_V, num_warps=4)
