"""The adjacency matrix A [V, SLOTS] (the top next tokens last seen after each token): drafting a tree from it and refreshing it from a verify forward's logits."""

from __future__ import annotations

import os

import torch

from .trees import SLOTS, TreeTemplate

class Adjacency:
    """A [V, 8] int32: the top-8 next tokens last seen after each token. A row that has never been
    written holds token 0 (drafts from it are wasted, never wrong: acceptance checks the model)."""

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu", table: torch.Tensor | None = None):
        if table is None:
            table = torch.zeros(vocab_size, SLOTS, dtype=torch.int32, device=device)
        if table.dtype != torch.int32 or table.dim() != 2 or table.shape[1] != SLOTS:
            raise ValueError(f"adjacency table must be int32 [V, {SLOTS}], got {table.dtype} {tuple(table.shape)}")
        self.table = table

    @property
    def vocab_size(self) -> int:
        return self.table.shape[0]

    def save(self, path: str | os.PathLike) -> None:
        torch.save({"format": "tokaccel.recycling.Adjacency/1", "table": self.table.cpu()}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "Adjacency":
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != "tokaccel.recycling.Adjacency/1":
            raise ValueError(f"{path}: not a tokaccel adjacency file (written by Adjacency.save)")
        return cls(data["table"].shape[0], table=data["table"].to(device))


def draft_tree(table: torch.Tensor, root: torch.Tensor, tree: TreeTemplate) -> torch.Tensor:
    """Tokens [n+1] (long) of the tree rooted at token `root` (0-d): node i = A[token of parent, slot]."""
    from ..kernels.recycling import tree_draft

    return tree_draft(table, root.reshape(1), tree.parent.to(table.device), tree.slot.to(table.device),
                      tree.depth.to(table.device), len(tree.levels))[0]


def seed_from_sequence(table: torch.Tensor, tokens: torch.Tensor) -> None:
    """For each token of `tokens` [L] followed by another, put that follower first in its row
    (the other candidates shift right); the last occurrence of a repeated token wins. Lets drafts
    copy spans of the prompt, as prompt lookup decoding does."""
    if tokens.numel() < 2:
        return
    rows, nxt = tokens[:-1], tokens[1:]
    order = torch.arange(rows.numel(), device=tokens.device)
    last = torch.full((table.shape[0],), -1, dtype=torch.long, device=tokens.device)
    last.scatter_reduce_(0, rows, order, reduce="amax")
    pick = last[rows] == order  # the last occurrence of each token
    rows, nxt = rows[pick], nxt[pick]
    current = table[rows]
    table[rows] = torch.cat((nxt[:, None].to(table.dtype), current[:, :-1]), dim=1)


def update_priority(tree: TreeTemplate, on_path: torch.Tensor) -> torch.Tensor:
    """[n+1] order in which duplicate tokens' rows are written (lowest wins): the accepted path wins,
    its deepest node first (the latest occurrence, as sequential decoding would leave it), then the
    rest in BFS order."""
    n = tree.size + 1
    order = torch.arange(n, device=on_path.device)
    return torch.where(on_path, -1 - tree.depth.to(on_path.device), order)


def update_adjacency(table: torch.Tensor, tokens: torch.Tensor, logits: torch.Tensor, priority: torch.Tensor) -> None:
    """A[tokens[i]] = top-8 of logits[i] [n, V] for each node i whose token no node with a lower
    `priority` also holds (one write per distinct token, no host sync)."""
    from ..kernels.recycling import adjacency_update

    same = tokens[:, None] == tokens[None, :]
    beaten = (same & (priority[None, :] < priority[:, None])).any(-1)
    adjacency_update(table, tokens, logits, ~beaten)
