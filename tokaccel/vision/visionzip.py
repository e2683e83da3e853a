"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): per image, keep the dominant tokens
(highest [CLS] attention at the feature layer) and merge the rest into a few contextual tokens
by key similarity; the merge happens on the vision features, before the projector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..validation import check_count_or_fraction, check_number
from .base import VisualPruning, picks_to_mask, span_features
from .families import VisionFamily
from .runtime import Pruner, StageInput, keep_count
from .vtc_cls import capture_cls


def zip_features(feats: torch.Tensor, cls_row: torch.Tensor, keys: torch.Tensor, keep, dominant_share: float):
    """One LLaVA batch of images (all with P patch rows).

    feats [n, P, Dv] projector input (patch rows only), cls_row [n, heads, P + 1], keys
    [n, P + 1, Dv] -> (feats with contextual rows merged [n, P, Dv], kept offsets [n, k] sorted).
    """
    n, P, _ = feats.shape
    k = int(keep_count(keep, torch.tensor([P]))[0])
    dom = min(k, max(1, round(k * dominant_share))) if k < P else P
    ctx = k - dom
    score = cls_row[:, :, 1:].sum(1)  # [n, P]
    dominant = score.topk(dom, dim=1).indices
    if ctx == 0:
        return feats, dominant.sort(1).values
    rest_mask = torch.ones(n, P, dtype=torch.bool, device=feats.device)
    rest_mask.scatter_(1, dominant, False)
    rest = torch.nonzero(rest_mask)[:, 1].view(n, P - dom)  # remaining offsets, in order
    step = max(1, (P - dom) // ctx)
    t_pos = torch.arange(0, P - dom, step, device=feats.device)[:ctx]
    is_target = torch.zeros(P - dom, dtype=torch.bool, device=feats.device)
    is_target[t_pos] = True
    targets, merge = rest[:, is_target], rest[:, ~is_target]  # [n, ctx], [n, M]
    metric = F.normalize(keys[:, 1:].float(), dim=-1)
    pick = lambda t, idx: t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
    sim = torch.bmm(pick(metric, merge), pick(metric, targets).transpose(1, 2))  # [n, M, ctx]
    assign = F.one_hot(sim.argmax(-1), ctx).to(feats.dtype)  # [n, M, ctx]
    counts = assign.sum(1).clamp(min=1)[..., None]  # [n, ctx, 1]
    merged = torch.bmm(assign.transpose(1, 2), pick(feats, merge)) / counts
    out = feats.clone()
    out.scatter_(1, targets[..., None].expand(-1, -1, feats.shape[-1]), pick(feats, targets) + merged)
    return out, torch.cat([dominant, targets], 1).sort(1).values


@dataclass
class VisionZip(VisualPruning):
    """VisionZip on LLaVA (CLIP tower with a CLS).

    keep: tokens per image (int or ratio); split dominant:contextual as 54:10 (the paper's 64-token
    setting) via `dominant_share`. Contextual tokens: every ((P - dominant) // contextual)-th
    remaining token is a target; each other remaining token joins its most similar target (cosine
    of the feature layer's keys, heads concatenated: the paper averages keys over heads), and the
    target becomes target + mean(joined), as in the official code. Kept tokens keep their own
    positions (a contextual token sits at its target's position).
    """

    name: ClassVar[str] = "visionzip"
    description: ClassVar[str] = ("VisionZip: dominant tokens by [CLS] attention + contextual tokens "
                                  "merged by similarity")
    needs_cls: ClassVar[bool] = True

    keep: int | float = 64
    dominant_share: float = 54 / 64

    def validate(self) -> None:
        check_count_or_fraction(self.name, "keep", self.keep, "tokens per image", "a ratio of them")
        check_number(self.name, "dominant_share", self.dominant_share, 0, 1, low_open=True)

    def vision_hooks(self, pruner: Pruner, family: VisionFamily) -> list:
        layer = family.cls.feature_layer
        handles = capture_cls(pruner, family, [layer], keys_layer=layer)

        def projector_hook(module, args):
            feats = args[0]
            cls, keys = pruner.vision.get("cls", {}).get(layer), pruner.vision.get("keys")
            if cls is None or keys is None or cls.shape[0] != feats.shape[0]:
                return None
            skip = 0 if family.cls.drops_cls else 1  # the CLS row, when it is an LLM token, is kept as is
            patches, offsets = zip_features(feats[:, skip:], cls, keys, self.keep, self.dominant_share)
            if skip:
                patches = torch.cat([feats[:, :1], patches], 1)
                offsets = torch.cat([offsets.new_zeros(offsets.shape[0], 1), offsets + 1], 1)
            pruner.vision["offsets"] = offsets
            return (patches,) + tuple(args[1:])

        handles.append(family.cls.projector.register_forward_pre_hook(projector_hook))
        return handles

    def select(self, stage: int, inp: StageInput) -> torch.Tensor:
        offsets = inp.signals["vision"].get("offsets")
        if offsets is None:
            raise RuntimeError("visionzip: the projector hook did not run for this prompt's images")
        x, n, rows = span_features(inp)
        if offsets.shape[0] != inp.n_images or bool((n != n[0]).any()) or int(offsets.max()) >= int(n.min()):
            raise ValueError(f"visionzip: {offsets.shape[0]} encoded images do not match the prompt's image "
                             f"spans {n.tolist()}: adjacent images must be separated by text")
        return picks_to_mask(inp, offsets.to(n.device), rows)
