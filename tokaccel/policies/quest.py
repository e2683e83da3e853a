"""Quest (arXiv 2406.10774): query-aware page selection by an upper bound (docs/methods.md §1.4).

The cache is cut into pages of `page` tokens; per page and KV head the elementwise max and min
key are kept beside the cache (`tokaccel.blocks.BlockIndex`, updated as tokens are appended).
A query's bound for a page, scale * sum_d max(q_d max_d, q_d min_d), is >= every logit of the
page. The best pages are read whole while their candidate tokens add up to at most `k`.

Differences from the paper, and why:
* one index set per layer for all heads (as every tokaccel selection policy: one gather serves
  GQA); per-head bounds are combined by `head_vote`: "max" (default: the bound over all heads,
  so a page any head may need is kept) or "soft" (TokenSelect's soft vote of the bounds).
* sinks (`n_init`) and a local window (`n_local`) are always read, and the pages next to them
  are always kept, so `k` means what it means for TokenSelect.
* `theta` defaults to 1.0 (a new selection at every decode step, as in the paper); the
  selection cache is available with a lower theta.
Everything else is the selection engine's (`tokaccel.policies.engine`: chunked prefill, sparse
reads, positions, dense fallback); this class is only the scorer (`choose`), its options and
defaults. Layers 0-1 stay dense (`dense_layers`), as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..blocks import CandidateBlocks, count_block_reads, layer_block_index
from ..selection import NEG_INF, score_rows, top_k
from ..validation import check_choice, check_int, invalid
from .base import LayerInfo
from .engine import SelectionPolicy

HEAD_VOTES = ("max", "soft")


@dataclass
class Quest(SelectionPolicy):
    """Page-level selection by Quest's upper bound. Defaults: the paper's for pages and layers;
    the engine's (TokenSelect's) for n_init, n_local, chunk, tail.

    page: tokens per page (16).
    dense_layers: the first layers, which stay dense (2).
    head_vote: "max" or "soft", how per-head page bounds become one page score (see above).
    theta: selection-cache threshold (1.0: select at every step, as the paper).
    position_mode: "original" (Quest keeps positions), "compact" or "auto" (see SelectionPolicy).
    Other options: see SelectionPolicy (`pool` is not supported: pages are read whole).
    """

    name: ClassVar[str] = "quest"
    description: ClassVar[str] = "Quest: top pages by a per-page max/min upper bound of q.k"
    verifies_trees: ClassVar[bool] = False  # the page index does not follow a draft tree's compaction

    theta: float = 1.0
    position_mode: str = "original"
    page: int = 16
    dense_layers: int = 2
    head_vote: str = "max"

    def validate(self) -> None:
        super().validate()
        check_int(self.name, "page", self.page, 1)
        check_int(self.name, "dense_layers", self.dense_layers, 0)
        check_choice(self.name, "head_vote", self.head_vote, HEAD_VOTES)
        if self.pool is not None:
            raise invalid(self.name, "pool", self.pool, "expected None (pages are read whole)")

    def applies_to(self, layer: LayerInfo) -> bool:
        return layer.layer_idx >= self.dense_layers and super().applies_to(layer)

    def choose(self, call, q, start, end, valid, query_valid=None):
        """Pages of [start, end) by bound, best first, while their candidates total <= k; see
        SelectionPolicy.choose."""
        B, T = q.shape[0], self.page
        index = layer_block_index(call, T, with_mean=False, with_bounds=True)
        cand = CandidateBlocks(start, end, valid, T, B, q.device)
        rows, weights = score_rows(q, call.key.shape[1], self.head_mapping, query_valid)
        span = slice(cand.first, cand.first + cand.n)
        chosen = self.page_choice(rows, weights, index.kmax[:, :, span], index.kmin[:, :, span], call.scale,
                                  cand.count, cand.forced)  # [B, n] pages read whole
        count_block_reads(call, cand.n, 2 * call.key.shape[3] * index.kmax.element_size())
        tokens = chosen.repeat_interleave(T, 1) & cand.token_valid  # [B, n * T]
        flag = torch.zeros(tokens.shape, device=q.device).masked_fill_(~tokens, NEG_INF)
        picked, picked_valid = top_k(flag, self.k)  # every chosen token: they number <= k
        return picked + cand.first * T, picked_valid

    def page_choice(self, rows: torch.Tensor, weights: torch.Tensor | None, kmax: torch.Tensor, kmin: torch.Tensor,
                    scale: float, count: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
        """[B, n] bool: the pages read whole. rows [B, R, D] / weights [B, R] (`score_rows`); kmax /
        kmin [B, Hk, n, D] the pages' bounds; count [B, n] their candidate tokens; forced [B, n]
        the pages kept first. Pages go best bound first while their candidates total <= k.
        tokaccel.vllm's whole-block path takes the same pages from its own page summaries."""
        from ..kernels.ops import block_bound_scores
        from ..kernels.soft_vote import softmax_head_sum

        bound = block_bound_scores(rows, kmax, kmin, scale)  # [B, R, n]
        empty = count == 0
        if self.head_vote == "max":
            if weights is not None:
                bound.masked_fill_(weights[:, :, None] == 0, NEG_INF)
            score = bound.amax(1)
        else:
            score = softmax_head_sum(bound.masked_fill_(empty[:, None], NEG_INF), weights, overwrite=True)
        score = score.masked_fill(empty, NEG_INF).masked_fill(forced, float("inf"))
        order = score.argsort(dim=1, descending=True)
        fits = (count.gather(1, order).cumsum(1) <= self.k) & (score.gather(1, order) > NEG_INF)
        return torch.zeros_like(fits).scatter_(1, order, fits)
