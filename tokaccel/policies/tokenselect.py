"""TokenSelect (arXiv 2411.02886): per-head soft-vote top-k token selection (docs/methods.md §1.1).

Every token stays in the cache; each attention call reads `sinks ∪ top-k ∪ local window`, with
a selection cache at decode and chunked sparse prefill: the engine (`tokaccel.policies.engine`).
TokenSelect's own part is the scorer: every candidate gets the soft vote of the scoring query,
v[t] = sum_h softmax_t(scale * q_h . K_kv(h), t), and the top k are read.

Positions default to "compact" (the paper's length extrapolation). Inside the model's trained
length compact positions cost accuracy at small budgets (SmolLM2, 1.9K-token passkey, k=256: 1/5
compact, 3/5 original = dense 3/5) and at long ones (Gemma-3-270M, trained to 32K,
niah_single_2 at 32K, k=2048, 10 samples: compact 30, original 50, original with `pool=15` 60 =
dense; docs/methods.md §1.1): use position_mode="original" or "auto" there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..selection import soft_vote
from .engine import SelectionPolicy


@dataclass
class TokenSelect(SelectionPolicy):
    """Dynamic token-level KV selection by the soft vote. Options and defaults: SelectionPolicy's
    (the paper's, except `tail`)."""

    name: ClassVar[str] = "tokenselect"
    description: ClassVar[str] = "TokenSelect: per-head soft-vote top-k token selection with a selection cache"

    def vote(self, q: torch.Tensor, keys: torch.Tensor, scale: float, valid, query_valid=None) -> torch.Tensor:
        """Soft votes [B, Nc] of q [B, H, D] or [B, H, w, D] for candidate keys [B, Hk, Nc, D]."""
        return soft_vote(q, keys, scale, valid, self.head_mapping, query_valid)
