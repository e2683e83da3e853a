"""H2O, heavy-hitter oracle (arXiv 2306.14048), with A2SF's forgetting factor (docs/methods.md §2.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..validation import check_count_or_fraction, check_number
from .eviction import Eviction, share


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
        super().validate()
        check_count_or_fraction(self.name, "recent", self.recent, "tokens", "a fraction of the budget", low=0,
                                low_open=False)
        check_number(self.name, "alpha", self.alpha, 0, 1, low_open=True)

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
