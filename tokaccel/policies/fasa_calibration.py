"""FASA's calibration file (docs/methods.md §1.3): the frequency-chunk (FC) maths the file is written
in, where the file lives, and reading / writing it. `tokaccel.calibrate` runs the model to make
one; the FASA policy only reads it, so it imports this module, never the calibration command.

File: $TOKACCEL_CACHE/fasa/<model key>.<pairing>.json (default ~/.cache/tokaccel), format FORMAT:
per layer and KV head the dominant FCs ranked by overlap (see tokaccel/calibrate.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..validation import check_choice

PAIRINGS = ("hf", "interleaved")
SELECTIONS = ("single", "combined")
FORMAT = "tokaccel-fasa-calibration/1"


def fc_pairs(x: torch.Tensor, pairing: str) -> torch.Tensor:
    """x [..., D] -> [..., D/2, 2]: the two dims of each frequency chunk."""
    check_choice("fasa", "pairing", pairing, PAIRINGS)
    D = x.shape[-1]
    if pairing == "hf":
        return torch.stack((x[..., :D // 2], x[..., D // 2:]), dim=-1)
    return x.reshape(*x.shape[:-1], D // 2, 2)


def fc_dims(fcs, head_dim: int, pairing: str) -> list[int]:
    """The head dims of the frequency chunks `fcs`, ascending: (i, i + D/2) or (2i, 2i+1)."""
    check_choice("fasa", "pairing", pairing, PAIRINGS)
    half = head_dim // 2
    dims = [d for i in fcs for d in ((i, i + half) if pairing == "hf" else (2 * i, 2 * i + 1))]
    return sorted(dims)


def model_key_of(model) -> str:
    """The name `tokaccel calibrate --model` takes for `model`: the embedded name for an embedded
    model, else its HF id / path, else a description of a config-built model."""
    from ..models import EMBEDDED

    path = getattr(model.config, "_name_or_path", "") or ""
    base = Path(path).name
    match = re.fullmatch(r"(.+)-tf[0-9][\w.+-]*", base)
    if match and match.group(1) in EMBEDDED:
        return match.group(1)
    if path:
        return path
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return f"{cfg.model_type}-L{cfg.num_hidden_layers}-H{cfg.hidden_size}-random"


def calibration_path(model_key: str, pairing: str = "hf") -> Path:
    """$TOKACCEL_CACHE/fasa/<model key>.<pairing>.json."""
    from ..models import cache_dir

    slug = re.sub(r"[^\w.-]+", "_", model_key.strip("/")) or "model"
    return cache_dir() / "fasa" / f"{slug}.{pairing}.json"


def calibrate_command(model_key: str, pairing: str = "hf") -> str:
    extra = "" if pairing == "hf" else f" --pairing {pairing}"
    return f"tokaccel calibrate --model {model_key} --policy fasa{extra}"


def load_calibration(source, model_key: str, pairing: str) -> dict:
    """A calibration dict from a dict, a JSON path, or None (the default file of `model_key`).
    A missing file raises FileNotFoundError naming the command that writes it."""
    if isinstance(source, dict):
        return source
    path = Path(source) if source is not None else calibration_path(model_key, pairing)
    if not path.exists():
        raise FileNotFoundError(f"fasa: no calibration at {path}; write it with: {calibrate_command(model_key, pairing)}")
    return json.loads(path.read_text())


def save_calibration(calibration: dict, path: str | Path | None = None) -> Path:
    path = Path(path) if path is not None else calibration_path(calibration["model"], calibration["pairing"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(calibration, indent=1))
    tmp.replace(path)
    return path
