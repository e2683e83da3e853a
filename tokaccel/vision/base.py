"""The base of every visual-token pruning policy: a `Policy` whose attention stays dense (HF's
SDPA) and whose `on_patch` installs the pruning hooks of `tokaccel.vision.runtime`.

A subclass says where it prunes (`stage_layers`: 0 = before the LLM, K >= 1 = before decoder
layer K, scored with layer K - 1's attention) and which image rows it keeps (`select`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..policies.base import LayerContext, LayerInfo, Policy
from ..policies.dense import dense_with_stats
from .families import VisionFamily, detect
from .runtime import Pruner, StageInput, keep_count, top_per_span


def span_features(inp: StageInput) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Image rows grouped per image: (x [S, Nmax, H] L2-normalised, n [S], (b, l) [S, Nmax] rows
    of each slot, -1 in padding)."""
    b, l = torch.nonzero(inp.image, as_tuple=True)  # row-major: grouped by image, in order
    span = inp.span[b, l]
    n = inp.span_len
    S, Nmax = n.numel(), int(n.max()) if n.numel() else 0
    start = torch.cumsum(n, 0) - n
    off = torch.arange(b.numel(), device=b.device) - start[span]
    x = inp.hidden.new_zeros(S, Nmax, inp.hidden.shape[-1])
    x[span, off] = F.normalize(inp.hidden[b, l].float(), dim=-1).to(x.dtype)
    rows_b = torch.full((S, Nmax), -1, dtype=torch.long, device=b.device)
    rows_l = rows_b.clone()
    rows_b[span, off], rows_l[span, off] = b, l
    return x, n, (rows_b, rows_l)


def picks_to_mask(inp: StageInput, picks: torch.Tensor, rows) -> torch.Tensor:
    """picks [S, K] slot indices (-1 = none) -> keep [B, L] bool."""
    keep = torch.zeros_like(inp.image)
    S = picks.shape[0]
    s = torch.arange(S, device=picks.device)[:, None].expand_as(picks)
    sel = picks >= 0
    rows_b, rows_l = rows
    keep[rows_b[s[sel], picks[sel]], rows_l[s[sel], picks[sel]]] = True
    return keep


def scores_to_rows(inp: StageInput, per_image: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Per-image score vectors (image i: [span_len[i]], in token order) -> [B, L] fp32 (0 elsewhere)."""
    flat = torch.cat(list(per_image)) if not isinstance(per_image, torch.Tensor) else per_image.flatten()
    out = torch.zeros(inp.image.shape, dtype=torch.float32, device=inp.image.device)
    out[inp.image] = flat.float().to(out.device)
    return out


@dataclass
class VisualPruning(Policy):
    """Base: dense attention everywhere, image tokens removed by hooks (see module docstring)."""

    # Set by subclasses that need LLaVA's CLIP [CLS] attention rows.
    needs_cls: ClassVar[bool] = False

    def applies_to(self, layer: LayerInfo) -> bool:
        return True

    def stage_layers(self, num_layers: int) -> list[int]:
        """Where the stages prune: 0 = before the LLM; K >= 1 = before decoder layer K."""
        return [0]

    def select(self, stage: int, inp: StageInput) -> torch.Tensor:
        """keep [B, L] bool over `inp.image` rows (other rows are always kept)."""
        raise NotImplementedError

    def check_family(self, family: VisionFamily) -> None:
        if self.needs_cls and family.cls is None:
            raise ValueError(
                f"{self.name}: needs a vision encoder with a [CLS] token whose patches map 1:1 onto the image "
                f"tokens (LLaVA with a CLIP tower, an int vision_feature_layer); {family.name} has none. "
                "Use divprune, mmr or fastv, which need no CLS."
            )

    def vision_hooks(self, pruner: Pruner, family: VisionFamily) -> list:
        """Extra hooks on the vision side (CLS capture, feature merging); removable handles."""
        return []

    def on_patch(self, model: torch.nn.Module, contexts: list[LayerContext]) -> list:
        family = detect(model)
        self.check_family(family)
        layers = self.stage_layers(len(family.layers))
        for k in layers:
            if k >= len(family.layers):
                raise ValueError(f"{self.name}: pruning layer {k} is past the decoder's {len(family.layers)} layers")
        pruner = Pruner(self, family, contexts[0].stats)
        for ctx in contexts:
            ctx.state = pruner
        return pruner.install() + self.vision_hooks(pruner, family)

    def attend(self, ctx: LayerContext, module, query, key, value, attention_mask, **kwargs):
        pruner: Pruner = ctx.state
        if pruner is not None and pruner.inner and (ctx.info.layer_idx + 1) in pruner.inner:
            self._capture_last_row(pruner, ctx.info.layer_idx + 1, module, query, key)
        return dense_with_stats(ctx, module, query, key, value, attention_mask, **kwargs)

    @staticmethod
    def _capture_last_row(pruner: Pruner, next_layer: int, module, query, key) -> None:
        """Mean-over-heads attention of each row's last real token over the keys, from the q/k
        rows this layer computed anyway (SDPA itself never returns probabilities)."""
        from ..kernels.last_row import last_row_attention

        seq = pruner.current
        g = pruner.inner.index(next_layer) + 1
        if seq is None or seq.phase != "prefill" or len(seq.groups) != g:
            return
        group = seq.groups[g - 1]
        if query.shape[2] != group.length or key.shape[2] != group.length:
            return  # not a whole-prompt prefill (e.g. a continued cache): nothing to prune against
        pos = torch.arange(group.length, device=query.device)[None]
        last = torch.where(group.valid, pos, -1).amax(1).clamp(min=0)
        q_last = query[torch.arange(query.shape[0], device=query.device), :, last]  # [B, H, D]
        seq.signals[g] = last_row_attention(q_last.contiguous(), key, module.scaling, group.valid)


def select_top(inp: StageInput, scores: torch.Tensor, keep) -> torch.Tensor:
    """Keep the `keep` best-scoring rows of each image (count from `keep_count`)."""
    return top_per_span(scores, inp.span, keep_count(keep, inp.span_len))
