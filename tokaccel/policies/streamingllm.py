"""StreamingLLM (arXiv 2309.17453): attention sinks + a window of recent tokens (docs/methods.md §2.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .eviction import Eviction, check_budget, check_int


@dataclass
class StreamingLLM(Eviction):
    """Keep each row's first `n_sink` real tokens and the newest `budget - n_sink`.

    budget: tokens kept per layer (int) or a fraction of the prompt (float in (0, 1)).
    n_sink: attention-sink tokens (paper 4); dropping them breaks the model.
    """

    name: ClassVar[str] = "streamingllm"
    description: ClassVar[str] = "StreamingLLM: keep attention sinks + a window of recent tokens"

    n_sink: int = 4

    def validate(self) -> None:
        check_budget(self.name, self.budget)
        check_int(self.name, "n_sink", self.n_sink, 0)
        if isinstance(self.budget, int) and self.n_sink >= self.budget:
            raise ValueError(f"streamingllm: n_sink={self.n_sink} leaves no window in budget={self.budget}")

    def priority(self, layer) -> torch.Tensor:
        return self.protect(layer.pos, self.sink_mask(layer, self.n_sink), layer)  # else: the newest first
