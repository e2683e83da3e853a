"""VTC-CLS (Wang et al., 2024, arXiv 2412.05819): rank image tokens by the vision encoder's
[CLS] attention to each patch, summed over several encoder layers, before the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..validation import check_count_or_fraction, check_int
from .base import VisualPruning, scores_to_rows, select_top
from .families import VisionFamily, cls_attention
from .runtime import Pruner, StageInput


def capture_cls(pruner: Pruner, family: VisionFamily, layers: list[int], keys_layer: int | None = None) -> list:
    """Pre-hooks on the vision attention of `layers`: store the CLS attention row
    [n_images, heads, P + 1] per layer (and the key rows [n_images, P + 1, Dv] of `keys_layer`)
    in `pruner.vision`, for the next prefill to consume."""
    if family.cls.capture is not None:
        return family.cls.capture(pruner, layers, keys_layer)
    handles = []
    for i in sorted(set(layers) | ({keys_layer} if keys_layer is not None else set())):
        module = family.cls.attn_layers[i]

        def hook(mod, args, kwargs, i=i):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            with torch.no_grad():
                if i in layers:
                    pruner.vision.setdefault("cls", {})[i] = cls_attention(mod, hidden)
                if i == keys_layer:
                    pruner.vision["keys"] = mod.k_proj(hidden)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def patch_scores(inp: StageInput, family: VisionFamily, cls_rows: torch.Tensor) -> list[torch.Tensor]:
    """[n_images, P + 1] CLS attention -> per-image scores in image-token order (the CLS row,
    when it is an LLM token, scores +inf so it is always kept). Checks the 1:1 mapping."""
    per_image = cls_rows[:, 1:] if family.cls.drops_cls else torch.cat(
        [torch.full_like(cls_rows[:, :1], float("inf")), cls_rows[:, 1:]], dim=1)
    if per_image.shape[0] != inp.n_images or bool((inp.span_len != per_image.shape[1]).any()):
        raise ValueError(
            f"CLS scores of {per_image.shape[0]} images x {per_image.shape[1]} tokens do not match the prompt's "
            f"image spans {inp.span_len.tolist()}: adjacent images must be separated by text"
        )
    return list(per_image)


@dataclass
class VTCCLS(VisualPruning):
    """VTC-CLS before the LLM (LLaVA with a CLIP tower).

    keep: tokens per image (int) or ratio. layers: how many encoder layers, ending at the one
    that produces the projected features, contribute their CLS attention (mean over heads,
    summed over layers).
    """

    name: ClassVar[str] = "vtc_cls"
    description: ClassVar[str] = "VTC-CLS: keep image tokens with high vision [CLS] attention (encoders with a CLS)"
    needs_cls: ClassVar[bool] = True

    keep: int | float = 0.25
    layers: int = 3

    def validate(self) -> None:
        check_count_or_fraction(self.name, "keep", self.keep, "tokens per image", "a ratio of them")
        check_int(self.name, "layers", self.layers, 1)

    def _layers(self, family: VisionFamily) -> list[int]:
        last = family.cls.feature_layer
        return list(range(max(0, last - self.layers + 1), last + 1))

    def vision_hooks(self, pruner: Pruner, family: VisionFamily) -> list:
        return capture_cls(pruner, family, self._layers(family))

    def select(self, stage: int, inp: StageInput) -> torch.Tensor:
        cls = inp.signals["vision"].get("cls")
        if not cls:
            raise RuntimeError("vtc_cls: no vision [CLS] attention was captured for this prompt's images")
        rows = sum(a.mean(1) for a in cls.values())  # [n_images, P + 1]
        return select_top(inp, scores_to_rows(inp, patch_scores(inp, inp.signals["family"], rows)), self.keep)
