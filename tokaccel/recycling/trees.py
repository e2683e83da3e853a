"""Draft tree templates: the paper's 80-node tree, nested sub-trees of it, and their ancestry."""

from __future__ import annotations

import math

import torch

from ..validation import invalid

SLOTS = 8  # candidates kept per token (columns of A)

# The paper's default tree (80 drafted nodes, depth 6; levels 8/21/25/15/8/3). A path lists, from
# the root, which of the parent token's A-slots each level takes.
PAPER_TREE = (
    [(s,) for s in range(8)]
    + [(0, s) for s in range(8)] + [(1, s) for s in range(4)] + [(2, s) for s in range(3)]
    + [(3, 0), (3, 1), (4, 0), (5, 0), (6, 0), (7, 0)]
    + [(0, 0, s) for s in range(8)] + [(0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1)]
    + [(0, s, 0) for s in range(3, 8)] + [(1, 0, 0), (1, 0, 1), (1, 1, 0)] + [(s, 0, 0) for s in range(2, 6)]
    + [(0, 0, 0, s) for s in range(5)] + [(0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 2, 0), (0, 0, 3, 0), (0, 0, 4, 0)]
    + [(0, 1, 0, 0), (0, 2, 0, 0)] + [(s, 0, 0, 0) for s in range(1, 4)]
    + [(0, 0, 0, 0, s) for s in range(3)] + [(0, 0, 0, 1, 0), (0, 0, 0, 2, 0), (0, 0, 1, 0, 0), (0, 1, 0, 0, 0),
                                             (1, 0, 0, 0, 0)]
    + [(0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0)]
)

# Sizes `tree="auto"` chooses among: nested prefixes of PAPER_TREE in `_priority` order (0 = plain
# one-token steps). No 1- or 2-node trees: on CPU a 2- or 3-row matmul is slower than a 4-row one
# (torch 2.13, SmolLM2's lm_head: 15 / 22 ms for 2 / 3 rows, 12 ms for 4).
AUTO_SIZES = (0, 3, 4, 6, 8, 12, 16, 24, 32, 48, 80)


def _priority(path: tuple[int, ...]) -> float:
    """A prior on how often a node is accepted: lower slots and shallower nodes first. Any order
    in which a node follows its parent makes every prefix a valid tree (its score is lower)."""
    return math.prod(0.8 / (1 + 0.6 * s) for s in path)


class TreeTemplate:
    """A static draft tree. Node 0 is the root (the last accepted token, not yet in the cache);
    node i >= 1 follows `paths[i - 1]`. Nodes are stored in BFS order (depth, then given order).

    parent [n+1] (root: 0), depth [n+1], slot [n+1] (root: 0), ancestors [n+1, n+1] bool
    (ancestors[i, j]: j is i or an ancestor of i), levels: index tensors of the nodes per depth >= 1,
    rank [n+1]: the node's position in the order the paths were given (root: -1).
    """

    def __init__(self, paths):
        paths = [tuple(int(s) for s in p) for p in paths]
        known = set()
        for p in paths:
            if p in known:
                raise invalid("tree template", "path", p, "it is listed twice (duplicate paths)")
            known.add(p)
        for p in paths:
            if not p:
                raise invalid("tree template", "path", p, "expected a non-empty path (the root is implicit)")
            if any(not 0 <= s < SLOTS for s in p):
                raise invalid("tree template", "path", p, f"expected every slot in [0, {SLOTS})")
            if len(p) > 1 and p[:-1] not in known:
                raise invalid("tree template", "path", p, f"its parent {p[:-1]} is not in the template")
        given = {p: i for i, p in enumerate(paths)}
        self.paths = sorted(paths, key=lambda p: (len(p), given[p]))
        index = {p: i + 1 for i, p in enumerate(self.paths)}
        n = len(self.paths) + 1
        self.parent = torch.tensor([0] + [index.get(p[:-1], 0) for p in self.paths])
        self.depth = torch.tensor([0] + [len(p) for p in self.paths])
        self.slot = torch.tensor([0] + [p[-1] for p in self.paths])
        self.rank = torch.tensor([-1] + [given[p] for p in self.paths])
        anc = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            anc[i] |= anc[int(self.parent[i])]
        self.ancestors = anc
        self.levels = [torch.nonzero(self.depth == d).flatten() for d in range(1, int(self.depth.max()) + 1)]

    @property
    def size(self) -> int:
        """Drafted nodes (the root excluded)."""
        return len(self.paths)

    def __repr__(self):
        return f"TreeTemplate({self.size} nodes, depth {len(self.levels)})"


def nested_trees(paths=PAPER_TREE, sizes=AUTO_SIZES) -> dict[int, TreeTemplate]:
    """Sub-trees of `paths` with the `sizes` most likely nodes (by `_priority`), each containing
    the smaller ones. Node ranks (TreeTemplate.rank) are positions in that priority order."""
    ordered = sorted(paths, key=lambda p: (-_priority(p), len(p), p))
    return {m: TreeTemplate(ordered[:m]) for m in sizes if 0 < m <= len(ordered)}
