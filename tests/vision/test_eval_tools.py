"""The proxy eval (real Gemma-3-270M inside an HF LLaVA, word-embedding "images")."""

import torch

import tokaccel
from tokaccel.vision import proxy_eval


def test_proxy_eval_cell_runs_through_the_llava_path(gemma3):
    vlm, tok = proxy_eval.build_proxy_vlm("gemma3-270m", loaded=gemma3)
    assert vlm.model.language_model is gemma3[0].model  # shared weights, no copy
    row = proxy_eval.run_cell(vlm, tok, "divprune", 0.25, samples=1, n_patches=16, noise=0.1, seed=0)
    assert row["kept_tokens_per_image"] == 4 and row["accuracy"] in (0.0, 1.0)
    assert tokaccel.get_policy(vlm) is None
    ids = proxy_eval.prompt_ids(tok, 16)
    assert int((ids == proxy_eval.IMAGE_TOKEN_ID).sum()) == 16


def test_random_baseline_keeps_the_budget():
    from tests.vision.tiny_vlms import llava

    model, inputs = llava(images_per_row=(1, 2))
    tokaccel.patch_model(model, policy=proxy_eval.RandomKeep(keep=0.25))
    with torch.no_grad():
        model(**inputs)
    assert [len(s) for s in tokaccel.vision.last_selection(model)] == [4, 4, 4]

