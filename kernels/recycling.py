"""Token Recycling's per-step ops: drafting a static tree from the adjacency matrix, and refreshing
the matrix from every tree node's logits (docs/methods.md §3).

Shapes: ``V`` vocabulary, ``S`` slots per token (8), ``B`` trees, ``n`` tree nodes (root first, a
node after its parent).

    tree_draft(table [V, S] int32, roots [B] long, parent [n] long, slot [n] long, depth [n] long)
        -> tokens [B, n] long: tokens[:, 0] = roots, tokens[:, i] = table[tokens[:, parent[i]], slot[i]]
    adjacency_update(table [V, S] int32, tokens [n] long, logits [n, V] fp32, write [n] bool) -> None
        table[tokens[i]] = top-S token ids of logits[i] (best first) for every i with write[i];
        rows of written tokens must be distinct (the caller picks one writer per token)

Both run without host synchronisation on the Triton path (the torch references index with
boolean masks; they are the CPU implementation, where a sync costs nothing).
"""
from __future__ import annotations

from typing import Optional

import torch

from .dispatch import HAS_TRITON, register_op

__all__ = ["tree_draft", "tree_draft_reference", "adjacency_update", "adjacency_update_reference"]


def _check_draft(table, roots, parent, slot, depth) -> None:
    if table.dtype != torch.int32 or table.dim() != 2:
        raise ValueError(f"tree_draft: table must be int32 [V, S], got {table.dtype} {tuple(table.shape)}")
    if roots.dim() != 1:
        raise ValueError(f"tree_draft: roots must be [B], got {tuple(roots.shape)}")
    n = parent.shape[0]
    for name, t in (("parent", parent), ("slot", slot), ("depth", depth)):
        if t.shape != (n,) or t.dtype != torch.long:
            raise ValueError(f"tree_draft: {name} must be long [{n}], got {t.dtype} {tuple(t.shape)}")
    for t in (roots, parent, slot, depth):
        if t.device != table.device:
            raise ValueError(f"tree_draft: inputs on {t.device} and {table.device}")


def tree_draft_reference(table, roots, parent, slot, depth, max_depth: Optional[int] = None) -> torch.Tensor:
    """Torch reference of :func:`tree_draft`: one gather per tree level."""
    max_depth = int(depth.max()) if max_depth is None else max_depth
    tokens = roots[:, None].expand(-1, parent.shape[0]).clone()
    for d in range(1, max_depth + 1):
        level = torch.nonzero(depth == d).flatten()
        tokens[:, level] = table[tokens[:, parent[level]], slot[level]].long()
    return tokens


def adjacency_update_reference(table, tokens, logits, write) -> None:
    """Torch reference of :func:`adjacency_update`."""
    rows = write.nonzero().flatten()
    if rows.numel():
        table[tokens[rows]] = logits[rows].topk(table.shape[1], dim=-1).indices.to(torch.int32)


if HAS_TRITON:
    from ._recycling_triton import adjacency_update_triton, tree_draft_triton
else:  # pragma: no cover - depends on the environment
    adjacency_update_triton = tree_draft_triton = None

_DRAFT = register_op("tree_draft", tree_draft_reference, tree_draft_triton)
_UPDATE = register_op("adjacency_update", adjacency_update_reference, adjacency_update_triton)


def tree_draft(table, roots, parent, slot, depth, max_depth: Optional[int] = None, *,
               backend: Optional[str] = None) -> torch.Tensor:
    """Draft tokens [B, n] of B trees of one template (see the module docstring); `max_depth`
    (the template's depth) saves a host read of depth.max()."""
    _check_draft(table, roots, parent, slot, depth)
    return _DRAFT(table, roots, parent, slot, depth, max_depth, backend=backend)


def adjacency_update(table, tokens, logits, write, *, backend: Optional[str] = None) -> None:
    """Write the top-S ids of logits[i] into table[tokens[i]] where write[i] (in place)."""
    if table.dtype != torch.int32 or table.dim() != 2:
        raise ValueError(f"adjacency_update: table must be int32 [V, S], got {table.dtype} {tuple(table.shape)}")
    n = tokens.shape[0]
    if logits.dim() != 2 or logits.shape[0] != n or logits.shape[1] < table.shape[1]:
        raise ValueError(f"adjacency_update: logits must be [{n}, V >= {table.shape[1]}], got {tuple(logits.shape)}")
    if write.shape != (n,) or write.dtype != torch.bool:
        raise ValueError(f"adjacency_update: write must be bool [{n}], got {write.dtype} {tuple(write.shape)}")
    _UPDATE(table, tokens, logits, write, backend=backend)
