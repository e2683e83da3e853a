"""Tiny random-weight VLMs of four HF families, and prompt batches for them (left padding,
several images per prompt). Each builder returns (model, inputs) with `inputs` ready for
`model(**inputs)` / `model.generate(**inputs)`."""

from __future__ import annotations

import torch

PAD, IMG = 0, 100
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=None)


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, rows))
    ids = torch.tensor([[PAD] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _prompt(images_per_row: list[int], tokens: int | list[int], seed: int, image_id: int = IMG,
            wrap: tuple[list[int], list[int]] = ([], [])) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    rows, i = [], 0
    for r, n_img in enumerate(images_per_row):
        row = torch.randint(3, 90, (2 + r,), generator=g).tolist()
        for _ in range(n_img):
            n = tokens[i] if isinstance(tokens, list) else tokens
            row += wrap[0] + [image_id] * n + wrap[1] + torch.randint(3, 90, (2,), generator=g).tolist()
            i += 1
        rows.append(row + torch.randint(3, 90, (3,), generator=g).tolist())
    return rows


def llava(images_per_row=(1, 2), seed=0, strategy="default"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                          image_size=32, patch_size=8)
    cfg = LlavaConfig(vision_config=vc, text_config=LlamaConfig(**TEXT), image_token_id=IMG,
                      vision_feature_layer=-2, vision_feature_select_strategy=strategy)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    n_tok = 16 if strategy == "default" else 17
    ids, mask = _left_pad(_prompt(list(images_per_row), n_tok, seed))
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(sum(images_per_row), 3, 32, 32, generator=g)
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def llava_next(images_per_row=(1, 2), seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=16, patch_size=8)
    cfg = LlavaNextConfig(vision_config=vc, text_config=LlamaConfig(**TEXT), image_token_id=IMG,
                          image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]], vision_feature_layer=-2)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    n = sum(images_per_row)
    sizes = torch.tensor([[16, 32], [32, 32], [32, 16], [16, 32]][:n])
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(n, 5, 3, 16, 16, generator=g)  # 5 = most patches of any pinpoint (+ base image)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
        counts = [f.shape[0] for f in feats]
    ids, mask = _left_pad(_prompt(list(images_per_row), counts, seed))
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)


def qwen2_vl(images_per_row=(1, 2), seed=0, version="2"):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    ids_ = dict(image_token_id=IMG, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103)
    text = {**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    if version == "2":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        cfg, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **ids_), Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16,
                      fullatt_block_indexes=[1])
        cfg, cls = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids_), Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    model = cls(cfg).eval()
    n = sum(images_per_row)
    thw = torch.tensor([[1, 4, 4], [1, 4, 6], [1, 6, 4], [1, 4, 4]][:n])
    counts = (thw.prod(-1) // 4).tolist()
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(int(thw.prod(-1).sum()), 3 * 2 * 4 * 4, generator=g)
    ids, mask = _left_pad(_prompt(list(images_per_row), counts, seed, wrap=([102], [103])))
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=thw,
                       mm_token_type_ids=(ids == IMG).int())


def idefics3(images_per_row=(1, 2), seed=0, smolvlm=False):
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, SmolVLMConfig,
                              SmolVLMForConditionalGeneration)

    config_cls, model_cls = ((SmolVLMConfig, SmolVLMForConditionalGeneration) if smolvlm
                             else (Idefics3Config, Idefics3ForConditionalGeneration))
    cfg = config_cls(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=8),
                         text_config=TEXT, image_token_id=IMG, scale_factor=2)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    n_max = max(images_per_row)
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(len(images_per_row), n_max, 3, 32, 32, generator=g)
    for r, n in enumerate(images_per_row):
        pixels[r, n:] = 0  # padding images (all zeros) are skipped by Idefics3
    ids, mask = _left_pad(_prompt(list(images_per_row), 4, seed))
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


BUILDERS = {"llava": llava, "llava_next": llava_next, "qwen2_vl": qwen2_vl,
            "qwen2_5_vl": lambda **kw: qwen2_vl(version="2.5", **kw), "idefics3": idefics3,
            "smolvlm": lambda **kw: idefics3(smolvlm=True, **kw)}
