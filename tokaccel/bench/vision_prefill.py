"""Prefill FLOPs and measured prefill time vs keep ratio on a tiny-but-wide random LLaVA.

The decoder is Llama-shaped (default 768 wide, 6 layers, GQA 12/4) and the prompt is one image
of 576 tokens (LLaVA-1.5's count) plus ~40 text tokens, batch 1, fp32, on whatever device the
model is put on. Weights are random: this measures cost, not accuracy.

    tokaccel bench vision [--keeps 1.0,0.5,0.25,0.1] [--methods divprune,fastv] [--repeats 3] [--out DIR]

appends the rows to DIR/bench_vision.csv and a markdown table to DIR/bench_vision.md.
FLOPs count the decoder's matmuls only (projections, MLP, QK^T and PV over the causal half),
per layer with that layer's sequence length, so FastV's full layers before K are included.
"""

from __future__ import annotations

import torch

from .timing import time_fn

IMAGE_TOKEN_ID = 100


def build(hidden: int = 768, layers: int = 6, heads: int = 12, kv_heads: int = 4, patches_side: int = 24):
    """(model, inputs): random LLaVA whose CLIP tower makes patches_side**2 tokens per image."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=4 * patches_side, patch_size=4)
    text = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=4096)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                      vision_feature_layer=-2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(0)
    n = patches_side**2
    ids = [1] + torch.randint(200, 1000, (20,), generator=g).tolist() + [IMAGE_TOKEN_ID] * n \
        + torch.randint(200, 1000, (20,), generator=g).tolist()
    ids = torch.tensor([ids])
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "pixel_values": torch.randn(1, 3, 4 * patches_side, 4 * patches_side, generator=g)}


def decoder_flops(config, lengths: list[int]) -> float:
    """Matmul FLOPs of one prefill whose layer i sees lengths[i] tokens."""
    d, f = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    proj = d * (config.num_attention_heads * hd) * 2 + d * (config.num_key_value_heads * hd) * 2  # q, o, k, v
    mlp = 3 * d * f
    total = 0.0
    for L in lengths:
        total += 2 * L * (proj + mlp)
        total += 2 * 2 * (L * (L + 1) / 2) * config.num_attention_heads * hd  # QK^T and PV, causal half
    return total


def run(keeps, methods, repeats: int = 3, **shape) -> list[dict]:
    import tokaccel

    model, inputs = build(**shape)
    text_cfg = model.config.text_config
    n_layers = text_cfg.num_hidden_layers
    L = inputs["input_ids"].shape[1]
    n_img = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())

    def timed() -> float:
        with torch.no_grad():
            return time_fn(lambda: model(**inputs, logits_to_keep=1), warmup=1, repeats=repeats, flush=False).median_s

    base = timed()
    dense_flops = decoder_flops(text_cfg, [L] * n_layers)
    rows = [{"method": "dense", "keep": 1.0, "image_tokens": n_img, "prompt_tokens": L, "prefill_s": round(base, 4),
             "speedup": 1.0, "gflops": round(dense_flops / 1e9, 2), "flops_ratio": 1.0}]
    for method in methods:
        for keep in keeps:
            tokaccel.patch_model(model, policy=method, keep=keep)
            try:
                t = timed()
                kept = tokaccel.stats(model)["vision_image_tokens_kept"] // (repeats + 1)
            finally:
                tokaccel.unpatch_model(model)
            start = tokaccel.make_policy(method).stage_layers(n_layers)[0]
            lengths = [L] * start + [L - n_img + kept] * (n_layers - start)
            flops = decoder_flops(text_cfg, lengths)
            rows.append({"method": method, "keep": keep, "image_tokens": kept, "prompt_tokens": L,
                         "prefill_s": round(t, 4), "speedup": round(base / t, 2), "gflops": round(flops / 1e9, 2),
                         "flops_ratio": round(flops / dense_flops, 3)})
    return rows
