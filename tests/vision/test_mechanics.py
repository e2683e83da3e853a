"""Visual-token pruning mechanics on tiny random VLMs of each family: exactness with keep=all,
generate vs a hand-built pruned sequence, FastV inside the LLM vs a layer-by-layer reference,
batched (left-padded, several images) vs single prompts, stats, unpatch, errors."""

import pytest
import torch

import tokaccel
from testkit.models import tiny_model
from testkit import vision_reference as reference
from testkit.tiny_vlms import BUILDERS, IMG

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"]


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _generate(model, inputs, steps=5):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


KEEP_ALL = [
    *[(f, "divprune", {}) for f in FAMILIES],
    ("llava", "fastv", {"layer": 1}), ("qwen2_vl", "fastv", {"layer": 2}), ("idefics3", "fastv", {}),
    ("llava", "vtc_cls", {}), ("llava", "visionzip", {}), ("qwen2_5_vl", "mmr", {}),
    ("llava_next", "todre", {"late_keep": 1.0, "layer": 3}),
]


@pytest.mark.parametrize("family,policy,extra", KEEP_ALL, ids=[f"{f}-{p}" for f, p, _ in KEEP_ALL])
def test_keep_all_equals_unpatched_and_unpatch_restores(family, policy, extra):
    model, inputs = BUILDERS[family]()
    ref = _logits(model, inputs)
    tokaccel.patch_model(model, policy=policy, keep=1.0, **extra)
    torch.testing.assert_close(_logits(model, inputs), ref, rtol=0, atol=1e-4)
    stats = tokaccel.stats(model)
    assert stats["vision_image_tokens_kept"] == stats["vision_image_tokens"] == int((inputs["input_ids"] == IMG).sum())
    tokaccel.unpatch_model(model)
    assert torch.equal(_logits(model, inputs), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_hand_built_pruned_sequence(family):
    model, inputs = BUILDERS[family]()
    dec = reference.decoder_inputs(model, inputs)
    tokaccel.patch_model(model, policy="divprune", keep=0.5)
    got = _generate(model, inputs)
    selection = tokaccel.vision.last_selection(model)
    image = inputs["input_ids"] == IMG
    counts = [len(s) for s in selection]
    span_sizes = _span_sizes(image)
    assert counts == [(n + 1) // 2 for n in span_sizes]  # ceil(0.5 n) per image
    stats = tokaccel.stats(model)
    assert stats["vision_images"] == len(span_sizes) and stats["vision_image_tokens_kept"] == sum(counts)
    tokaccel.unpatch_model(model)
    want = reference.greedy_on_kept(model, dec, reference.kept_columns(image, selection), got.shape[1])
    assert torch.equal(got, want), (got, want)


def _span_sizes(image):
    sizes = []
    for row in image.tolist():
        run = 0
        for v in row + [False]:
            if v:
                run += 1
            elif run:
                sizes.append(run)
                run = 0
    return sizes


@pytest.mark.parametrize("family,policy", [("llava", "vtc_cls"), ("qwen2_vl", "mmr")])
def test_generate_equals_hand_built_for_other_selectors(family, policy):
    model, inputs = BUILDERS[family]()
    dec = reference.decoder_inputs(model, inputs)
    tokaccel.patch_model(model, policy=policy, keep=3)
    got = _generate(model, inputs)
    selection = tokaccel.vision.last_selection(model)
    assert all(len(s) == 3 for s in selection)
    tokaccel.unpatch_model(model)
    want = reference.greedy_on_kept(model, dec, reference.kept_columns(inputs["input_ids"] == IMG, selection), 5)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_fastv_generate_equals_layerwise_reference(family):
    model, inputs = BUILDERS[family](images_per_row=(2,))
    dec = reference.decoder_inputs(model, inputs)
    tokaccel.patch_model(model, policy="fastv", keep=0.25, layer=2)
    got = _generate(model, inputs)
    selection = tokaccel.vision.last_selection(model)
    tokaccel.unpatch_model(model)
    cols = reference.kept_columns(inputs["input_ids"] == IMG, selection)[0]
    assert torch.equal(got, reference.fastv_layerwise(model, dec, cols, 2, got.shape[1]))


@pytest.mark.parametrize("family,policy,extra", [("llava", "fastv", {"keep": 0.25}),
                                                 ("qwen2_vl", "todre", {"keep": 0.5, "late_keep": 0.5, "layer": 3}),
                                                 ("llava_next", "divprune", {"keep": 4})])
def test_batched_left_padded_equals_single_prompts(family, policy, extra):
    model, inputs = BUILDERS[family](images_per_row=(1, 2))
    tokaccel.patch_model(model, policy=policy, **extra)
    batched = _generate(model, inputs)
    batched_sel = tokaccel.vision.last_selection(model)
    singles, single_sel = [], []
    for row, n_img in ((0, 1), (1, 2)):
        _, one = BUILDERS[family](images_per_row=(1, 2))
        one = _row(one, row, n_img, family)
        singles.append(_generate(model, one))
        single_sel += tokaccel.vision.last_selection(model)
    assert batched_sel == single_sel
    assert torch.equal(batched, torch.cat(singles))


def _row(inputs, row, n_img, family):
    """Row `row` of a batch, without its padding, with its own images."""
    keep = inputs["attention_mask"][row].bool()
    out = {"input_ids": inputs["input_ids"][row:row + 1, keep],
           "attention_mask": inputs["attention_mask"][row:row + 1, keep]}
    first = 0 if row == 0 else 1
    if family == "qwen2_vl":
        thw = inputs["image_grid_thw"]
        patches = thw.prod(-1)
        start = int(patches[:first].sum())
        out["pixel_values"] = inputs["pixel_values"][start:start + int(patches[first:first + n_img].sum())]
        out["image_grid_thw"] = thw[first:first + n_img]
        out["mm_token_type_ids"] = inputs["mm_token_type_ids"][row:row + 1, keep]
    else:
        out["pixel_values"] = inputs["pixel_values"][first:first + n_img]
        if "image_sizes" in inputs:
            out["image_sizes"] = inputs["image_sizes"][first:first + n_img]
    return out


def test_forward_then_manual_decode_without_positions_matches_generate():
    model, inputs = BUILDERS["llava"](images_per_row=(1, 2))
    tokaccel.patch_model(model, policy="divprune", keep=5)
    want = _generate(model, inputs, steps=2)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        # generate's positions come from the mask (cumsum); a plain forward uses 0..L-1 like HF does
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(tok)], 1)
        nxt = model(input_ids=tok, attention_mask=mask, cache=out.cache, use_cache=True).logits[:, -1].argmax(-1)
    assert torch.equal(tok[:, 0], want[:, 0])
    # row 1 is unpadded, so its forward positions equal generate's: the second token must match
    assert int(nxt[1]) == int(want[1, 1])


def test_stats_report_tokens_per_image_and_selection_is_sorted():
    model, inputs = BUILDERS["llava"](images_per_row=(1, 2))
    tokaccel.patch_model(model, policy="fastv", keep=5, layer=1)
    _logits(model, inputs)
    sel = tokaccel.vision.last_selection(model)
    assert [len(s) for s in sel] == [5, 5, 5] and all(s == sorted(s) and max(s) < 16 for s in sel)
    stats = tokaccel.stats(model)
    assert (stats["vision_images"], stats["vision_image_tokens"], stats["vision_image_tokens_kept"]) == (3, 48, 15)


def test_text_only_prompt_is_untouched():
    model, inputs = BUILDERS["llava"]()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    tokaccel.patch_model(model, policy="todre", keep=2, late_keep=0.0, layer=2)
    torch.testing.assert_close(_logits(model, {"input_ids": ids}), ref, rtol=0, atol=1e-5)
    assert tokaccel.stats(model).get("vision_images", 0) == 0


def test_errors_are_clear():
    model, _ = BUILDERS["qwen2_vl"]()
    for policy in ("vtc_cls", "visionzip"):
        with pytest.raises(ValueError, match="CLS"):
            tokaccel.patch_model(model, policy=policy)
        assert tokaccel.get_policy(model) is None
    with pytest.raises(ValueError, match="past the decoder"):
        tokaccel.patch_model(model, policy="fastv", layer=4)
    for bad in (0, -1, 0.0, 1.5, True, "10"):
        with pytest.raises(ValueError, match="keep"):
            tokaccel.patch_model(model, policy="divprune", keep=bad)
    with pytest.raises(ValueError, match="lam"):
        tokaccel.make_policy("mmr", lam=2)
    with pytest.raises(ValueError, match="layer"):
        tokaccel.make_policy("fastv", layer=0)
    with pytest.raises(ValueError, match="late_keep"):
        tokaccel.make_policy("todre", late_keep=-0.5)
    gemma, ids = _tiny_gemma3(), torch.tensor([[5, 6, 101] + [IMG] * 16 + [102, 7, 8]])
    gemma_inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), token_type_ids=(ids == IMG).long())
    for policy, match in (("fastv", "sliding-window"), ("divprune", "prebuilt dict")):
        tokaccel.patch_model(gemma, policy=policy)
        with pytest.raises(NotImplementedError, match=match):
            _logits(gemma, gemma_inputs)
        tokaccel.unpatch_model(gemma)
    with pytest.raises(ValueError, match="vision-language"):
        tokaccel.patch_model(tiny_model("llama"), policy="divprune")
    assert tokaccel.make_policy("divprune:keep=64").keep == 64


def _tiny_gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=4)
    tc = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=8,
                          sliding_window_pattern=3, max_position_embeddings=512, pad_token_id=0)
    cfg = Gemma3Config(vision_config=vc.to_dict(), text_config=tc.to_dict(), mm_tokens_per_image=16,
                       image_token_id=IMG, boi_token_index=101, eoi_token_index=102)
    return Gemma3ForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("policy", ["visionzip", "vtc_cls", "todre"])
def test_generate_path_prunes_like_forward(policy):
    """generate encodes images before prefill (mm_encoder_outputs): same selection and first token
    as a plain forward."""
    model, inputs = BUILDERS["llava"](images_per_row=(1, 2))
    tokaccel.patch_model(model, policy=policy, keep=6, **({"layer": 2} if policy == "todre" else {}))
    first = _logits(model, inputs)[:, -1].argmax(-1)
    sel = tokaccel.vision.last_selection(model)
    got = _generate(model, inputs, steps=2)
    assert tokaccel.vision.last_selection(model) == sel
    assert [len(s) for s in sel] == ([3, 3, 3] if policy == "todre" else [6, 6, 6])
    assert torch.equal(got[:, 0], first)
