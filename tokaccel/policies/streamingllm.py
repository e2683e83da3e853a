"""StreamingLLM (arXiv 2309.17453): attention sinks + a window of recent tokens (docs/methods.md §2.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..validation import check_int, invalid
from .eviction import Eviction


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
        super().validate()
        check_int(self.name, "n_sink", self.n_sink, 0)
        if not isinstance(self.budget, float) and self.n_sink >= self.budget:
            raise invalid(self.name, "n_sink", self.n_sink,
                          f"it leaves no window in budget={self.budget} (expected n_sink < budget)")

    def priority(self, layer) -> torch.Tensor:
        return self.protect(layer.pos, self.sink_mask(layer, self.n_sink), layer)  # else: the newest first
