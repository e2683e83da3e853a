"""Rotate / un-rotate / re-position keys and queries with any model's rotary embedding.

HF models apply RoPE in the `rotate_half` layout: dims `(i, i + R/2)` form one 2-D pair rotated by
`position * inv_freq[i]`, with `cos`/`sin` of shape `[..., S, R]` (halves duplicated, possibly
multiplied by the rope type's `attention_scaling`). `R` may be smaller than the head dim
(partial rotary): the remaining dims pass through unchanged. Tensors are `[B, heads, S, D]`;
cos/sin `[B, S, R]` or `[S, R]` broadcast over the heads.
"""

from __future__ import annotations

import inspect

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _split(x: torch.Tensor, rot: int):
    return (x, None) if rot == x.shape[-1] else (x[..., :rot], x[..., rot:])


def _heads(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # cos/sin [B, S, R] -> [B, 1, S, R]; [S, R] broadcasts as is
    return t.unsqueeze(1) if t.dim() == 3 and x.dim() == 4 else t


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE: x [B, h, S, D] with cos/sin [B, S, R] or [S, R] (R <= D) -> [B, h, S, D]."""
    cos, sin = _heads(cos, x).to(x.dtype), _heads(sin, x).to(x.dtype)
    xr, rest = _split(x, cos.shape[-1])
    out = xr * cos + rotate_half(xr) * sin
    return out if rest is None else torch.cat((out, rest), dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Inverse of `rotate` (rotation by -angle, divided by the rope's `attention_scaling` squared).

    Computed in fp32 (rounded once to x's dtype), so un-rotate(rotate(k)) == k to fp32 precision.
    """
    cos, sin = _heads(cos, x).float(), _heads(sin, x).float()
    xr, rest = _split(x, cos.shape[-1])
    xf = xr.float()
    out = xf * cos - rotate_half(xf) * sin
    if scaling != 1.0:
        out = out / (scaling * scaling)
    out = out.to(x.dtype)
    return out if rest is None else torch.cat((out, rest), dim=-1)


class RopeTable:
    """cos/sin of one layer type at positions 0..n-1, computed with the model's own rotary module
    (so every rope type it supports is honoured) and cached; grows by doubling."""

    def __init__(self, rotary: torch.nn.Module, layer_type: str | None = None):
        self.rotary = rotary
        params = inspect.signature(rotary.forward).parameters
        self._kwargs = {"layer_type": layer_type} if "layer_type" in params else {}
        self._cos = self._sin = None

    def __call__(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [n, R] for positions 0..n-1."""
        if self._cos is None or self._cos.shape[0] < n or self._cos.device != device:
            size = max(256, 1 << (max(n, 1) - 1).bit_length())
            positions = torch.arange(size, device=device)[None]
            probe = torch.empty(0, device=device, dtype=torch.float32)
            cos, sin = self.rotary(probe, positions, **self._kwargs)
            self._cos, self._sin = cos[0].float(), sin[0].float()
        return self._cos[:n].to(dtype), self._sin[:n].to(dtype)

    @property
    def scaling(self) -> float:
        """The rope type's `attention_scaling` (cos at position 0)."""
        if self._cos is None:
            self(1, torch.device("cpu"), torch.float32)
        return float(self._cos[0, 0])


def find_rotary_embedding(model: torch.nn.Module, config) -> torch.nn.Module | None:
    """The decoder's rotary embedding module: a `*RotaryEmbedding` module built from `config`
    (the attention modules' config), else the only non-vision one; None if there is none."""
    candidates = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    for module in candidates:
        if getattr(module, "config", None) is config:
            return module
    text = [m for m in candidates if "vision" not in type(m).__name__.lower()]
    return text[0] if len(text) == 1 else None
