"""Visual-token pruning for HF vision-language models (docs/methods.md §4), as `patch_model` policies.

    tokaccel.patch_model(vlm, policy="divprune", keep=64)      # or keep=0.1 (ratio per image)
    vlm.generate(**inputs)                                     # forward and generate both prune
    tokaccel.stats(vlm)["vision_image_tokens_kept"]            # + vision_images, vision_image_tokens
    tokaccel.vision.last_selection(vlm)                        # kept offsets per image, last prompt

Policies: fastv, vtc_cls, visionzip, divprune, mmr, todre (one file each). Model-specific code
is in `families.py`, the hooks in `runtime.py`. Importing this package changes nothing.
"""

from __future__ import annotations

import torch

from .divprune import DivPrune
from .fastv import FastV
from .mmr import MMR
from .todre import ToDRE
from .visionzip import VisionZip
from .vtc_cls import VTCCLS

POLICIES = (FastV, VTCCLS, VisionZip, DivPrune, MMR, ToDRE)


def last_selection(model: torch.nn.Module) -> list[list[int]] | None:
    """Kept token offsets (within each image, ascending) of the last pruned prompt, images in
    batch-major prompt order; None before the first one."""
    from ..patch import patch_state

    state = patch_state(model)
    pruner = next((c.state for c in state.contexts), None) if state is not None else None
    if pruner is None or not hasattr(pruner, "last_selection"):
        raise ValueError("model is not patched with a visual-token pruning policy")
    return pruner.last_selection


__all__ = ["FastV", "VTCCLS", "VisionZip", "DivPrune", "MMR", "ToDRE", "POLICIES", "last_selection"]
