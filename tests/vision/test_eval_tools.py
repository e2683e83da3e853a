"""The proxy eval (real Gemma-3-270M inside an HF LLaVA, word-embedding "images")."""

import torch

import tokaccel
from tokaccel.evals import vision_proxy as proxy_eval


def test_proxy_eval_cell_runs_through_the_llava_path(gemma3):
    vlm, tok = proxy_eval.build_proxy_vlm("gemma3-270m", loaded=gemma3)
    assert vlm.model.language_model is gemma3[0].model  # shared weights, no copy
    row = proxy_eval.run_cell(vlm, tok, "divprune", 0.25, samples=1, n_patches=16, noise=0.1, seed=0)
    assert row["kept_tokens_per_image"] == 4 and row["accuracy"] in (0.0, 1.0)
    assert tokaccel.get_policy(vlm) is None
    ids = proxy_eval.prompt_ids(tok, 16)
    assert int((ids == proxy_eval.IMAGE_TOKEN_ID).sum()) == 16


def test_random_baseline_keeps_the_budget():
    from testkit.tiny_vlms import llava

    model, inputs = llava(images_per_row=(1, 2))
    tokaccel.patch_model(model, policy=proxy_eval.RandomKeep(keep=0.25))
    with torch.no_grad():
        model(**inputs)
    assert [len(s) for s in tokaccel.vision.last_selection(model)] == [4, 4, 4]



def test_summary_tower_hands_llm_the_same_features_and_its_attention_as_cls(gemma3):
    """Through the SummaryTower (VTC-CLS / VisionZip) the LLM sees exactly the pre-encoded
    features; the [CLS] rows are the summary token's eager attention over [BOS, patches, "\\n"],
    and VTC-CLS keeps the patches with the largest sum of them over its layers."""
    import random

    lm, tok = gemma3
    vlm, tok = proxy_eval.build_proxy_vlm("gemma3-270m", loaded=gemma3, tower_depth=4)
    ids = proxy_eval.prompt_ids(tok, 16)
    _, feats = proxy_eval.make_sample(random.Random(0), tok, vlm.get_input_embeddings(), 16, 0.1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        pre = vlm(input_ids=ids, attention_mask=mask, **proxy_eval.image_inputs("divprune", feats)).logits
        tower = vlm(input_ids=ids, attention_mask=mask, **proxy_eval.image_inputs("vtc_cls", feats)).logits
    assert torch.equal(pre, tower)
    assert lm.config._attn_implementation == "sdpa"  # restored after the tower's eager pass

    embed = lm.get_input_embeddings()
    seq = torch.cat([embed(torch.tensor([[tok.bos_token_id]])), feats[None],
                     embed(torch.tensor([[tok("\n", add_special_tokens=False)["input_ids"][-1]]]))], 1)
    lm.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attn = lm(inputs_embeds=seq, output_attentions=True).attentions
    finally:
        lm.set_attn_implementation("sdpa")
    want = {i: torch.cat([attn[i][:, :, -1, -1:], attn[i][:, :, -1, 1:-1]], -1) for i in range(4)}
    for i in range(4):
        torch.testing.assert_close(vlm.model.vision_tower.captured["cls"][i], want[i].float())

    tokaccel.patch_model(vlm, policy="vtc_cls", keep=3, layers=2)  # feature layer 3: layers 2 and 3
    try:
        with torch.no_grad():
            vlm(input_ids=ids, attention_mask=mask, **proxy_eval.image_inputs("vtc_cls", feats))
        score = (want[2].mean(1) + want[3].mean(1))[0, 1:]
        assert tokaccel.vision.last_selection(vlm) == [sorted(score.topk(3).indices.tolist())]
    finally:
        tokaccel.unpatch_model(vlm)
    row = proxy_eval.run_cell(vlm, tok, "visionzip", 0.25, samples=1, n_patches=16, noise=0.1, seed=0)
    assert row["kept_tokens_per_image"] == 4 and tokaccel.get_policy(vlm) is None

