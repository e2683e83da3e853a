"""MMR importance/diversity selection (IDPruner-style, docs/methods.md §4): greedy
argmax lambda * importance - (1 - lambda) * max cosine to the picked tokens, after the projector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..validation import check_choice, check_count_or_fraction, check_number
from .base import VisualPruning, picks_to_mask, span_features
from .runtime import StageInput, keep_count

IMPORTANCE = ("text", "norm")


def importance_rows(inp: StageInput, kind: str) -> torch.Tensor:
    """[B, L] fp32 importance of each row. "text": max cosine to the prompt's text tokens (the
    question) in the input embedding space; "norm": the feature's L2 norm."""
    h = inp.hidden.float()
    if kind == "norm":
        return h.norm(dim=-1)
    u = F.normalize(h, dim=-1)
    # the text rows of each sequence, left-aligned into [B, T, H]: an [L, T] product, not [L, L]
    text = inp.text
    T = max(int(text.sum(1).max()), 1)
    b_idx, l_idx = torch.nonzero(text, as_tuple=True)
    slot = text.long().cumsum(1)[b_idx, l_idx] - 1
    t = u.new_zeros(u.shape[0], T, u.shape[-1])
    t[b_idx, slot] = u[b_idx, l_idx]
    present = torch.zeros(u.shape[0], T, dtype=torch.bool, device=u.device)
    present[b_idx, slot] = True
    sim = torch.bmm(u, t.transpose(1, 2)).masked_fill(~present[:, None, :], float("-inf"))
    return sim.amax(-1).clamp(min=-1.0)


@dataclass
class MMR(VisualPruning):
    """Maximal-marginal-relevance pruning before the LLM.

    keep: tokens per image (int) or ratio. lam: weight of importance (1 = importance only,
    0 = DivPrune's diversity with an importance-based first pick); 0.5 as in IDPruner.
    importance: "text" (cosine to the question's token embeddings) or "norm". Importance is
    min-max scaled to [0, 1] per image so that lam weighs two quantities of the same range
    (cosine similarity is in [-1, 1]).
    """

    name: ClassVar[str] = "mmr"
    description: ClassVar[str] = "MMR: greedy lambda*importance - (1-lambda)*redundancy over image tokens"

    keep: int | float = 0.25
    lam: float = 0.5
    importance: str = "text"

    def validate(self) -> None:
        check_count_or_fraction(self.name, "keep", self.keep, "tokens per image", "a ratio of them")
        check_number(self.name, "lam", self.lam, 0, 1)
        check_choice(self.name, "importance", self.importance, IMPORTANCE)

    def select(self, stage: int, inp: StageInput) -> torch.Tensor:
        from ..kernels.diversity import greedy_select

        x, n, rows = span_features(inp)
        imp_rows = importance_rows(inp, self.importance)
        valid = rows[0] >= 0
        imp = torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
        imp[valid] = imp_rows[rows[0][valid], rows[1][valid]]
        lo = imp.masked_fill(~valid, float("inf")).amin(1, keepdim=True)
        hi = imp.masked_fill(~valid, float("-inf")).amax(1, keepdim=True)
        imp = ((imp - lo) / (hi - lo).clamp(min=1e-12)).masked_fill(~valid, 0.0)
        first = imp.masked_fill(~valid, float("-inf")).argmax(1)
        picks = greedy_select(x, n, keep_count(self.keep, n), first, imp, float(self.lam))
        return picks_to_mask(inp, picks, rows)
