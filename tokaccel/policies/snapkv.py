"""SnapKV (arXiv 2404.14469): the prompt's last `window` queries vote for the tokens to keep
(docs/methods.md §2.3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..validation import check_int, invalid
from .eviction import INF, Eviction


@dataclass
class SnapKV(Eviction):
    """At every multi-token call (the prompt), each KV head keeps the last `window` tokens and the
    tokens with the most votes: the attention of the last `window` queries (mean over the G query
    heads, summed over queries), average-pooled over `kernel` neighbouring positions.

    Decoding keeps the cache within the budget too (SnapKV itself lets it grow): a generated token
    is never evicted, the prompt token with the fewest votes goes first.

    budget: tokens kept per layer (int) or a fraction of the prompt (float in (0, 1)).
    window: observation window (paper 32). kernel: pooling width, odd (paper 5; 1 = no pooling).
    """

    name: ClassVar[str] = "snapkv"
    description: ClassVar[str] = "SnapKV: the prompt's last queries vote (pooled) for the tokens each KV head keeps"

    window: int = 32
    kernel: int = 5

    def validate(self) -> None:
        super().validate()
        check_int(self.name, "window", self.window, 1)
        check_int(self.name, "kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise invalid(self.name, "kernel", self.kernel, "expected an odd integer")

    def observe(self, layer, query, key, scale, key_valid, new_valid, probs) -> None:
        q = query.shape[2]
        if q == 1:  # a generated token: kept until the budget holds nothing else
            layer.score[:, :, -1] = INF
            return
        from ..kernels.ops import attention_column_sums

        w = min(self.window, q)
        votes = attention_column_sums(query[:, :, -w:], key, scale, causal=True, key_valid=key_valid,
                                      query_valid=None if new_valid is None else new_valid[:, -w:])
        if self.kernel > 1:  # pool along positions (slots of earlier calls are not in position order)
            order = layer.pos.argsort(dim=-1)
            in_order = votes.gather(2, order)
            B, Hk, N = in_order.shape
            pooled = F.avg_pool1d(in_order.reshape(B * Hk, 1, N), self.kernel, stride=1, padding=self.kernel // 2)
            votes = torch.empty_like(votes).scatter_(2, order, pooled.reshape(B, Hk, N))
        layer.score.copy_(votes)

    def priority(self, layer) -> torch.Tensor:
        generated = torch.isinf(layer.score)
        return self.protect(layer.score, self.recent_mask(layer, self.window) | generated, layer)
