"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): keep the most diverse image tokens,
greedy max-min (farthest point) on cosine distance, after the projector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..validation import check_count_or_fraction
from .base import VisualPruning, picks_to_mask, span_features
from .runtime import StageInput, keep_count


def divprune_keep(inp: StageInput, keep) -> torch.Tensor:
    """Max-min diverse rows of each image: keep [B, L] bool."""
    from ..kernels.diversity import farthest_first, greedy_select

    x, n, rows = span_features(inp)
    k = keep_count(keep, n)
    picks = greedy_select(x, n, k, farthest_first(x, n))
    return picks_to_mask(inp, picks, rows)


@dataclass
class DivPrune(VisualPruning):
    """DivPrune before the LLM, on the projected image features (the rows that replace the
    placeholders). keep: tokens per image (int) or ratio; the paper keeps ~10%.

    Same selection as the official code (first pick: the token whose nearest neighbour is
    farthest; then the max of the min distance to the picked set), computed with a running-min
    vector in O(K N D) (`tokaccel.kernels.greedy_select`, Triton on CUDA) instead of the
    official O(K^2 N) re-reduction over an N x N matrix; per image, any batch size.
    """

    name: ClassVar[str] = "divprune"
    description: ClassVar[str] = "DivPrune: keep max-min diverse image tokens (cosine) before the LLM"

    keep: int | float = 0.1

    def validate(self) -> None:
        check_count_or_fraction(self.name, "keep", self.keep, "tokens per image", "a ratio of them")

    def select(self, stage: int, inp: StageInput) -> torch.Tensor:
        return divprune_keep(inp, self.keep)
