"""ToDRE-style two-stage pruning (ToDRE, 2025: token diversity, then task relevance):
DivPrune's max-min diversity before the LLM, then, before a late decoder layer, drop the
remaining image tokens the last prompt token attends to least."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..validation import check_count_or_fraction, check_optional_int
from .base import VisualPruning, select_top
from .divprune import divprune_keep
from .runtime import StageInput


@dataclass
class ToDRE(VisualPruning):
    """Two stages.

    keep: stage 1, diverse image tokens kept per image before the LLM (int or ratio; ~10%).
    layer: stage 2 prunes before this decoder layer (scored with layer `layer - 1`'s attention);
        None = two thirds of the depth.
    late_keep: stage 2, share (float in [0, 1]) or number (int) of the stage-1 tokens kept from
        `layer` on; 0 removes every image token there, as ToDRE does once image tokens stop
        mattering to the task in deep layers.
    """

    name: ClassVar[str] = "todre"
    description: ClassVar[str] = "ToDRE-style: diversity before the LLM, task relevance in a late decoder layer"

    keep: int | float = 0.1
    layer: int | None = None
    late_keep: int | float = 0.5

    def validate(self) -> None:
        check_count_or_fraction(self.name, "keep", self.keep, "tokens per image", "a ratio of them")
        check_count_or_fraction(self.name, "late_keep", self.late_keep, "stage-1 tokens", "a ratio of them", low=0,
                                low_open=False)
        check_optional_int(self.name, "layer", self.layer, 1)

    def stage_layers(self, num_layers: int) -> list[int]:
        return [0, self.layer if self.layer is not None else max(1, (2 * num_layers) // 3)]

    def select(self, stage: int, inp: StageInput) -> torch.Tensor:
        if stage == 0:
            return divprune_keep(inp, self.keep)
        if self.late_keep == 0:
            return torch.zeros_like(inp.image)
        return select_top(inp, inp.signals["attn"], self.late_keep)
