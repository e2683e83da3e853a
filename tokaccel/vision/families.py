"""Per-family facts and hooks for HF vision-language models (transformers 5.x).

Everything model-specific of visual-token pruning lives here: where the multimodal model, its
text decoder and decoder layers are, the image placeholder id, how decode positions continue
(1-D, or Qwen2-VL's 3-D M-RoPE with `rope_deltas`), and, for LLaVA's CLIP tower, the vision
[CLS] attention rows that VTC-CLS and VisionZip score with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

TEXT_MODEL_ATTRS = ("language_model", "text_model")


@dataclass
class VisionFamily:
    """What the pruning runtime needs from one loaded VLM."""

    name: str  # config.model_type of the multimodal model
    outer: torch.nn.Module  # the XModel whose forward merges image features into inputs_embeds
    text_model: torch.nn.Module  # the decoder (LlamaModel, Qwen2VLTextModel, ...)
    layers: list  # text_model.layers
    image_token_id: int
    mrope: bool  # positions are [3, B, L] (Qwen2-VL / Qwen2.5-VL) and decode adds `rope_deltas`
    cls: "ClsTower | None" = field(default=None)  # CLS attention source (LLaVA + CLIP), else None
    window: int | None = None  # smallest sliding window of the decoder's sliding layers (Gemma3), else None

    def decode_positions(self, seen: torch.Tensor, q: int) -> torch.Tensor:
        """Positions of `q` new tokens after `seen` [B] original prompt+generated tokens, when the
        caller gave none: what the unpruned model computes from its cache length."""
        pos = seen[:, None] + torch.arange(q, device=seen.device)[None, :]
        if not self.mrope:
            return pos
        deltas = getattr(self.outer, "rope_deltas", None)
        pos = pos[None].expand(3, -1, -1)
        return pos + deltas.to(pos.device) if deltas is not None else pos


@dataclass
class ClsTower:
    """A vision encoder with a [CLS] token at row 0 whose patch rows map 1:1, in order, onto
    the image placeholder tokens (LLaVA with a CLIP tower, or a tower that declares its own:
    a `cls_tower(outer) -> ClsTower` method on the vision model, with `capture` set)."""

    attn_layers: list  # the encoder's self-attention modules (q_proj / k_proj / num_heads / scale)
    feature_layer: int  # index of the encoder layer whose output feeds the projector
    drops_cls: bool  # vision_feature_select_strategy == "default": the CLS row is not an LLM token
    projector: torch.nn.Module
    # custom towers: capture(pruner, layers, keys_layer) -> hook handles that store, per encoding, the
    # CLS rows [n_images, heads, P + 1] of `layers` in pruner.vision["cls"][i] and the key rows
    # [n_images, P + 1, Dk] of `keys_layer` in pruner.vision["keys"]; None = CLIP pre-hooks on attn_layers
    capture: Callable | None = None


def _find_outer(model: torch.nn.Module) -> torch.nn.Module:
    for cand in (getattr(model, "model", None), model):
        if cand is not None and hasattr(cand, "get_image_features") and any(
            hasattr(cand, a) for a in TEXT_MODEL_ATTRS
        ):
            return cand
    raise ValueError(
        f"{type(model).__name__} is not a vision-language model tokaccel's visual-token pruning knows: it "
        f"needs a `get_image_features` method and a text decoder at .{'/.'.join(TEXT_MODEL_ATTRS)} "
        "(LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, ... in transformers 5.x)"
    )


def _cls_tower(outer: torch.nn.Module) -> ClsTower | None:
    cfg = outer.config
    tower = getattr(outer, "vision_tower", None)
    vision_model = getattr(tower, "vision_model", tower)  # CLIPVisionModel holds the encoder itself in 5.x
    if callable(getattr(vision_model, "cls_tower", None)):
        return vision_model.cls_tower(outer)
    embeddings = getattr(vision_model, "embeddings", None)
    if cfg.model_type != "llava" or getattr(embeddings, "class_embedding", None) is None:
        return None
    feature_layer = cfg.vision_feature_layer
    strategy = cfg.vision_feature_select_strategy
    if not isinstance(feature_layer, int) or strategy not in ("default", "full"):
        return None
    layers = list(vision_model.encoder.layers)
    # hidden_states[i] is the output of encoder layer i - 1 (hidden_states[0]: the embeddings)
    index = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer
    if not 1 <= index <= len(layers):
        return None
    return ClsTower([layer.self_attn for layer in layers], index - 1, strategy == "default",
                    outer.multi_modal_projector)


def detect(model: torch.nn.Module) -> VisionFamily:
    """The VisionFamily of a loaded HF VLM; ValueError naming what is missing otherwise."""
    outer = _find_outer(model)
    text_model = next(getattr(outer, a) for a in TEXT_MODEL_ATTRS if hasattr(outer, a))
    layers = getattr(text_model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(text_model).__name__} has no `.layers`: cannot hook its decoder layers")
    cfg = outer.config
    image_token_id = getattr(cfg, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(cfg, "image_token_index", None)
    if image_token_id is None:
        raise ValueError(f"{type(outer).__name__}: config has no image_token_id")
    tcfg = text_model.config
    layer_types = getattr(tcfg, "layer_types", None)
    sliding = ("sliding_attention" in layer_types if layer_types else
               bool(getattr(tcfg, "sliding_window", None)) and getattr(tcfg, "use_sliding_window", True))
    window = int(tcfg.sliding_window) if sliding else None
    mrope = hasattr(outer, "get_rope_index")
    return VisionFamily(cfg.model_type, outer, text_model, list(layers), int(image_token_id), mrope,
                        _cls_tower(outer), window)


def cls_attention(module: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The [CLS] query row of one vision self-attention, from its input rows.

    hidden [n, P + 1, Dv] (the attention module's input) -> [n, heads, P + 1] softmax probabilities.
    Only the CLS query is projected: one [n, Dv] x [Dv, Dv] product plus the keys.
    """
    n, P1, _ = hidden.shape
    heads = module.num_heads
    q = module.q_proj(hidden[:, :1]).view(n, 1, heads, -1).transpose(1, 2)  # [n, h, 1, d]
    k = module.k_proj(hidden).view(n, P1, heads, -1).transpose(1, 2)  # [n, h, P+1, d]
    scores = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * module.scale
    return scores.softmax(-1)


def attention_keys(module: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Key rows of one vision self-attention: hidden [n, P + 1, Dv] -> [n, P + 1, Dv] (heads concatenated)."""
    return module.k_proj(hidden)
