"""H2O, heavy-hitter oracle (arXiv 2306.14048), with A2SF's forgetting factor (docs/methods.md §2.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .eviction import Eviction, check_budget, share


@dataclass
class H2O(Eviction):
    """Keep the `recent` newest tokens and the heavy hitters: the tokens with the largest attention
    accumulated over every query so far (per KV head, mean over its G query heads).

    budget: tokens kept per layer (int) or a fraction of the prompt (float in (0, 1)).
    recent: tokens of the budget kept for the newest tokens, as tokens (int) or a fraction of the
        budget (float); the rest are heavy hitters. Paper default: half and half (0.5).
    alpha: A2SF forgetting factor in (0, 1]: acc = alpha * acc + p for every new query, so old
        attention fades (A2SF suggests 0.99); 1 is H2O's plain sum.
    """

    name: ClassVar[str] = "h2o"
    description: ClassVar[str] = "H2O: evict all but the heavy hitters (accumulated attention) and recent tokens; A2SF alpha"
    decode_probs: ClassVar[bool] = True

    recent: int | float = 0.5
    alpha: float = 1.0

    def validate(self) -> None:
        check_budget(self.name, self.budget)
        ok = (isinstance(self.recent, int) and not isinstance(self.recent, bool) and self.recent >= 0) or \
             (isinstance(self.recent, float) and 0 <= self.recent <= 1)
        if not ok:
            raise ValueError(f"h2o: recent={self.recent!r} is not valid; expected tokens (an int >= 0) or a "
                             "fraction of the budget (a float in [0, 1])")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1:
            raise ValueError(f"h2o: alpha={self.alpha!r} is not valid; expected a number in (0, 1]")

    def observe(self, layer, query, key, scale, key_valid, new_valid, probs) -> None:
        q = query.shape[2]
        if probs is None:
            from ..kernels.ops import attention_column_sums

            weight = None
            if self.alpha != 1:  # query i of q is followed by q-1-i newer ones in this call
                weight = self.alpha ** torch.arange(q - 1, -1, -1, device=query.device, dtype=torch.float32)
                weight = weight.expand(query.shape[0], q)
            probs = attention_column_sums(query, key, scale, causal=True, key_valid=key_valid,
                                          query_valid=new_valid, query_weight=weight)
        layer.score.mul_(self.alpha ** q).add_(probs)

    def priority(self, layer) -> torch.Tensor:
        return self.protect(layer.score, self.recent_mask(layer, share(self.recent, layer.budget)), layer)
