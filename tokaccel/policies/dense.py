"""Dense attention: the exactness baseline every other policy is compared with."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..validation import check_choice
from .base import LayerContext, LayerInfo, Policy

BACKENDS = ("auto", "sdpa", "flash")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def dense_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    mask_kind: str = "sdpa",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Full attention through HF's own SDPA (or flash-attn) function, so results match an
    unpatched model exactly. query [B, H, q, D], key/value [B, Hk, kv, D] -> out [B, q, H, D].
    `mask_kind` says which mask function built `attention_mask` ("sdpa": 4-D bool or None,
    "flash": 2-D padding mask or None)."""
    if mask_kind == "flash":
        from transformers.integrations.flash_attention import flash_attention_forward

        return flash_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def dense_with_stats(ctx: LayerContext, module, query, key, value, attention_mask, **kwargs):
    """dense_attention for a patched layer, counting what it reads (a sliding layer reads its window)."""
    window = kwargs.get("sliding_window")
    keys = key.shape[2] if window is None else min(key.shape[2], window)
    ctx.stats["dense_calls"] += 1
    ctx.stats.record_read(query.shape[0], query.shape[2], keys, key.shape[1], key.shape[3], key.element_size())
    return dense_attention(module, query, key, value, attention_mask, mask_kind=ctx.mask_kind, **kwargs)


@dataclass
class Dense(Policy):
    """Every query reads every key.

    backend: "auto" (flash-attn for fp16/bf16 models on CUDA when it is installed, SDPA
    otherwise), "sdpa", or "flash" (error unless flash-attn is installed and the model is on CUDA).
    """

    name: ClassVar[str] = "dense"
    description: ClassVar[str] = "full attention (SDPA; flash-attn on CUDA when installed): the exactness baseline"
    attends_through_mask: ClassVar[bool] = True

    backend: str = "auto"

    def validate(self) -> None:
        check_choice(self.name, "backend", self.backend, BACKENDS)

    def applies_to(self, layer: LayerInfo) -> bool:
        return True

    def mask_kind(self, model: torch.nn.Module) -> str:
        param = next(model.parameters())
        flash_ok = param.is_cuda and param.dtype in (torch.float16, torch.bfloat16) and flash_attn_available()
        if self.backend == "flash" and not flash_ok:
            raise ValueError(
                "dense: backend='flash' needs flash-attn installed (pip install 'tokaccel[flash]') and a "
                f"fp16/bf16 model on CUDA; this model is {param.dtype} on {param.device}"
            )
        return "flash" if self.backend != "sdpa" and flash_ok else "sdpa"

    def attend(self, ctx: LayerContext, module, query, key, value, attention_mask, **kwargs):
        return dense_with_stats(ctx, module, query, key, value, attention_mask, **kwargs)
