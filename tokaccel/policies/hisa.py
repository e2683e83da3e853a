"""HISA (arXiv 2603.28458): hierarchical block-then-token selection (docs/methods.md §1.2).

TokenSelect's miss step scores every candidate key. HISA scores blocks of `block` tokens first,
from per-block summaries kept beside the cache (`tokaccel.blocks.BlockIndex`, updated as tokens
are appended), keeps the `m` best blocks (the blocks next to the sinks and the local window are
always kept), then runs TokenSelect's soft vote only over the tokens of those blocks and takes the
top `k`. A miss reads N / block summaries + m * block keys instead of N keys.

Everything else is the selection engine's (`tokaccel.policies.engine`: sinks, local window,
selection cache, chunked prefill, sparse reads, position modes, dense fallback): this class is
only the scorer (`choose`) and its options.

Stage-1 block scores (`block_score`):
  "mean":  soft vote of the block mean keys, sum_h softmax_b(scale * q_h . mean_b): the block's
           mean logit per head (the paper's indexer with the model's own q.k).
  "bound": soft vote of Quest's upper bound scale * sum_d max(q_d max_b,d, q_d min_b,d), which
           is >= every logit in the block, so a block holding one strong token is not outvoted.
When every candidate block fits in `m` (N <= m * block) the index set equals TokenSelect's.
The original targets DeepSeek's trained lightning indexer; standard models have none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..blocks import CandidateBlocks, count_block_reads, layer_block_index
from ..selection import NEG_INF, score_rows, top_k
from ..validation import check_choice, check_int, invalid
from .base import LayerContext, LayerInfo
from .engine import SelectionCall, SelectionPolicy

BLOCK_SCORES = ("mean", "bound")


@dataclass
class HISA(SelectionPolicy):
    """A two-stage (block, then token) scorer. Defaults: docs/methods.md §1.2 for the blocks;
    the engine's (TokenSelect's) for everything else.

    block: tokens per block (Bk, 128).
    m: blocks kept by stage 1 (64); m * block must be >= k.
    block_score: "mean" (mean key, HISA) or "bound" (max/min keys, Quest's upper bound).
    Other options: see SelectionPolicy (`pool` is not supported: kept blocks are not contiguous).
    """

    name: ClassVar[str] = "hisa"
    description: ClassVar[str] = "HISA: block-then-token soft-vote selection (block index beside the cache)"
    verifies_trees: ClassVar[bool] = False  # the block index does not follow a draft tree's compaction

    block: int = 128
    m: int = 64
    block_score: str = "mean"

    def validate(self) -> None:
        super().validate()
        check_int(self.name, "block", self.block, 1)
        check_int(self.name, "m", self.m, 1)
        check_choice(self.name, "block_score", self.block_score, BLOCK_SCORES)
        if self.m * self.block < self.k:
            raise ValueError(f"hisa: m * block = {self.m * self.block} is smaller than k={self.k}; "
                             "stage 1 must keep at least k tokens")
        if self.pool is not None:
            raise invalid(self.name, "pool", self.pool, "expected None (kept blocks are not contiguous)")

    def choose(self, call, q, start, end, valid, query_valid=None):
        """Stage 1 over the blocks of [start, end), stage 2 inside the m best; see SelectionPolicy.choose."""
        from ..kernels.ops import block_bound_scores, block_token_scores, grouped_scores
        from ..kernels.block_index import block_token_rows
        from ..kernels.soft_vote import softmax_head_sum

        B, Hk, T = q.shape[0], call.key.shape[1], self.block
        index = layer_block_index(call, T, with_mean=self.block_score == "mean",
                                  with_bounds=self.block_score == "bound")
        cand = CandidateBlocks(start, end, valid, T, B, q.device)
        rows, weights = score_rows(q, Hk, self.head_mapping, query_valid)
        span = slice(cand.first, cand.first + cand.n)
        if self.block_score == "mean":
            s = grouped_scores(rows.float(), index.mean[:, :, span], call.scale)  # [B, R, n]
            count_block_reads(call, cand.n, 4 * call.key.shape[3])
        else:
            s = block_bound_scores(rows, index.kmax[:, :, span], index.kmin[:, :, span], call.scale)
            count_block_reads(call, cand.n, 2 * call.key.shape[3] * index.kmax.element_size())
        empty = cand.count == 0
        s.masked_fill_(empty[:, None], NEG_INF)
        block_vote = softmax_head_sum(s, weights, overwrite=True)
        block_vote = block_vote.masked_fill(empty, NEG_INF).masked_fill(cand.forced, float("inf"))
        kept, kept_valid = top_k(block_vote, self.m)  # [B, m'] block offsets, ascending

        local_rows = block_token_rows(kept, T)  # [B, m' * T] rows of token_valid
        token_valid = kept_valid.repeat_interleave(T, 1) & cand.token_valid.gather(1, local_rows)
        s = block_token_scores(rows, call.key, kept + cand.first, T, call.scale)  # [B, R, m' * T]
        call.count_scored(kept.shape[1] * T)
        s.masked_fill_(~token_valid[:, None], NEG_INF)
        vote = softmax_head_sum(s, weights, overwrite=True).masked_fill_(~token_valid, NEG_INF)
        picked, picked_valid = top_k(vote, self.k)  # ascending in block order = ascending rows
        return (local_rows + cand.first * T).gather(1, picked), picked_valid


def selection_iou(policy: SelectionPolicy, reference: SelectionPolicy, q: torch.Tensor, keys: torch.Tensor,
                  key_valid: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """IoU per row [B] of the candidates two selection policies choose for the same decode step
    (docs/methods.md §1.2: report HISA's IoU with the flat selection beyond m * block): scoring
    queries q [B, H, D] against cached keys [B, Hk, N, D] (as the policies store them), candidates
    between the sinks and the local window of `reference`."""
    from ..stats import Stats

    B, Hk, N, D = keys.shape
    info = LayerInfo(0, q.shape[1], Hk, D, None, "full_attention")
    scale = D ** -0.5 if scale is None else scale
    end = max(N - reference.n_local, 0)
    sets = []
    for p in (policy, reference):
        call = SelectionCall(p, LayerContext(info, p, Stats()), q[:, :, None], keys, keys, key_valid, scale)
        mid, valid = call.select(q, end)
        chosen = torch.zeros(B, N + 1, dtype=torch.bool, device=keys.device)
        sets.append(chosen.scatter_(1, torch.where(valid, mid, N), True)[:, :N])
    union = (sets[0] | sets[1]).sum(1)
    return (sets[0] & sets[1]).sum(1) / union.clamp_min(1)
