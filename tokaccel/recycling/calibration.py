"""Measuring which tree sizes pay on this device (per model, policy, dtype, threads), cached on disk."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..cache import cache_kwarg
from ..cpu_linear import packed_count
from ..patch import patch_state
from .masks import TreeAttention, tree_masks
from .trees import AUTO_SIZES, nested_trees

def calibration_file() -> Path:
    root = os.environ.get("TOKACCEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tokaccel")
    return Path(root) / "recycling_calibration.json"


def calibration_key(model, device) -> str:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    dtype = next(model.parameters()).dtype
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    patch = patch_state(model)
    policy = str(patch.policy) if patch is not None else "unpatched"
    return (f"{name}|{policy}|{type(model).__name__}|L{cfg.num_hidden_layers}|H{cfg.hidden_size}|V{cfg.vocab_size}|"
            f"{device.type}|{str(dtype).replace('torch.', '')}|threads{torch.get_num_threads()}|"
            f"packed{packed_count(model)}")


@torch.no_grad()
def calibrate(model, cache, context_len: int, sizes=AUTO_SIZES, trees=None, repeats: int = 3,
              tree_kwargs=lambda tree: {}) -> dict[int, float]:
    """Seconds of one verify forward per tree size, measured on `cache` (left as it was), median
    of `repeats`. Results are cached per (model, device, dtype, threads, packed linears) in
    ~/.cache/tokaccel/recycling_calibration.json (TOKACCEL_CACHE overrides the folder)."""
    device = next(model.parameters()).device
    path, key = calibration_file(), calibration_key(model, device)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    if key in saved and all(str(m) in saved[key] for m in sizes):
        return {m: float(saved[key][str(m)]) for m in sizes}
    trees = trees or nested_trees(sizes=sizes)
    name = cache_kwarg(model)
    valid = torch.ones(context_len, dtype=torch.bool, device=device)
    seconds = {}
    with TreeAttention(model):
        for m in sizes:
            tree = trees.get(m)
            n = tree.size + 1 if tree else 1
            ids = torch.zeros(1, n, dtype=torch.long, device=device)
            pos = (context_len + (tree.depth if tree else torch.zeros(1, dtype=torch.long)))[None].to(device)
            mask = tree_masks(model, tree, cache, context_len, valid, device) if tree else None
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True, **{name: cache},
                      **(tree_kwargs(tree) if tree else {}))
                times.append(time.perf_counter() - start)
                cache.crop(-n)
            seconds[m] = sorted(times[1:])[len(times[1:]) // 2]
    saved[key] = {str(m): s for m, s in seconds.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved, indent=1))
    except OSError:
        pass
    return seconds
