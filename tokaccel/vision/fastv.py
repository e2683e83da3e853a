"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764): after decoder layer K, drop the image tokens
the last prompt token attends to least."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..validation import check_count_or_fraction, check_int
from .base import VisualPruning, select_top
from .runtime import StageInput


@dataclass
class FastV(VisualPruning):
    """FastV inside the LLM.

    layer: image tokens are removed before decoder layer `layer` (0-based), scored with the
        attention of layer `layer - 1`: the paper's K=2 keeps layers 0-1 full.
    keep: image tokens kept per image: an int, or a ratio (the paper's R=50% drop = keep 0.5).

    Differs from the paper: the score (mean over heads of the last real prompt token's attention
    to each image token) is computed from that layer's q/k rows, so SDPA/flash stay in use (the
    paper needs eager attention's full [L, L] map); the budget is per image (the paper ranks all
    image tokens of the prompt together); batch > 1 with padding works (the official code
    hard-codes LLaVA-1.5's prompt offsets, batch 1).
    """

    name: ClassVar[str] = "fastv"
    description: ClassVar[str] = "FastV: drop image tokens with low last-token attention after decoder layer K"

    keep: int | float = 0.5
    layer: int = 2

    def validate(self) -> None:
        check_count_or_fraction(self.name, "keep", self.keep, "tokens per image", "a ratio of them")
        check_int(self.name, "layer", self.layer, 1)

    def stage_layers(self, num_layers: int) -> list[int]:
        return [self.layer]

    def select(self, stage: int, inp: StageInput) -> torch.Tensor:
        return select_top(inp, inp.signals["attn"], self.keep)
