"""A proxy accuracy eval for visual-token pruning with a real language model and fake "images".

No VLM weights can be fetched here, so the language model of an embedded real LLM (default
Gemma-3-270M) is wrapped in an HF `LlavaForConditionalGeneration` (its vision tower is never run)
and each "image" is handed to `generate` pre-encoded (`mm_encoder_outputs`, the path 5.x uses
for images anyway). An image is an 8 x 8 grid of 64 patch tokens whose features are the LLM's
own input embeddings of words: mostly background words (" grass", " sky", " water"), one animal
word (" cat", " owl", ...), every patch plus Gaussian noise (std = `noise` x the embeddings' std)
so that background patches are similar, not identical. The prompt asks which animal is in the
"image"; a sample scores 1 when the answer names it. Pruning keeps `keep` of the 64 tokens
through the exact hooks a real LLaVA uses.

VTC-CLS and VisionZip need a vision encoder with a [CLS]. None is available here, so for them the
"image" goes through `SummaryTower`: the same language model reads [BOS, patches, "\n"] and the
summary token's attention to the patches (task-agnostic: the question is not in it) stands in for
the [CLS] attention; the LLM still receives the patch features themselves.

What it can show: whether a method keeps the one informative token among redundant ones, and
how that degrades with the budget. What it cannot: real images (spatially correlated patches,
objects spread over many patches), a real vision encoder's [CLS], real VLM attention patterns,
or any benchmark number.

    python -m tokaccel.evals.vision_proxy [--samples 50] [--keeps 0.05,0.1,0.25,0.5] [--methods "fastv;divprune"]

writes benchmarks/results/vision/<config>/results.json, results.csv and accuracy_vs_keep.png
(existing cells are reused).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..validation import check_count_or_fraction
from ..vision.base import VisualPruning
from ..vision.runtime import StageInput, keep_count, top_per_span

logger = logging.getLogger(__name__)

ANIMALS = [" cat", " dog", " bird", " fish", " horse", " cow", " sheep", " pig", " duck", " lion", " tiger", " bear",
           " mouse", " rabbit", " frog", " snake", " goat", " wolf", " fox", " owl"]
BACKGROUND = [" grass", " sky", " water"]
PROMPT = "Words:@@\nThe animal in the list of words above is a"
IMAGE_TOKEN_ID = 10  # an unused special token of both embedded tokenizers; replaced by the features
DEFAULT_METHODS = ("random", "fastv", "divprune", "mmr", "todre", "todre:late_keep=0", "vtc_cls", "visionzip")
CLS_METHODS = ("vtc_cls", "visionzip")


@dataclass
class RandomKeep(VisualPruning):
    """Baseline (not registered): keep `keep` random image tokens per image (seeded)."""

    name: ClassVar[str] = "random"
    description: ClassVar[str] = "random image tokens (baseline)"
    keep: int | float = 0.25
    seed: int = 0

    def validate(self) -> None:
        check_count_or_fraction(self.name, "keep", self.keep, "tokens per image", "a ratio of them")

    def select(self, stage: int, inp: StageInput) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        scores = torch.rand(inp.image.shape, generator=g).to(inp.image.device)
        return top_per_span(scores, inp.span, keep_count(self.keep, inp.span_len))


def make_method(name: str, keep: float):
    """Policy for one method (a name or "name:key=value" spec) at one budget."""
    if name == "random":
        return RandomKeep(keep=keep)
    from ..registry import make_policy

    return make_policy(name, keep=keep)


class SummaryTower(torch.nn.Module):
    """The proxy's stand-in for a vision encoder with a [CLS] token (VTC-CLS, VisionZip).

    The language model itself (not a submodule: it is already the VLM's decoder; its own hooks are
    bypassed) reads [BOS, patches, summary token] causally with eager attention. Encoder layer i
    = decoder layer i (i < depth); its [CLS] row = the summary token's attention [n, heads, P + 1]
    (summary first, then the patches; BOS dropped) and its keys = the layer's key rows
    (normed, before RoPE, heads concatenated) in the same order.

    pixel_values [n, P, H] (patch features, LLM embedding space) -> hidden_states
    ([n, P + 1, H],): row 0 the summary token, then the features unchanged, so with
    `vision_feature_layer=0, strategy="default"` and an identity projector the LLM sees exactly
    the features the other methods see.
    """

    def __init__(self, lm: torch.nn.Module, summary_id: int, bos_id: int | None, depth: int):
        super().__init__()
        self._lm = (lm,)  # a tuple keeps the shared decoder out of this module's children
        self.summary_id, self.bos_id, self.depth = summary_id, bos_id, depth
        self.captured: dict = {}

    def forward(self, pixel_values: torch.Tensor, return_dict=True, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        lm = self._lm[0]
        embed = lm.get_input_embeddings()
        feats = pixel_values.to(embed.weight.dtype)
        n, P = feats.shape[:2]
        token = lambda i: embed(torch.tensor([[i]], device=feats.device)).expand(n, 1, -1)  # noqa: E731
        parts = ([token(self.bos_id)] if self.bos_id is not None else []) + [feats, token(self.summary_id)]
        skip = len(parts) - 2  # rows before the first patch
        implementation = lm.config._attn_implementation
        lm.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                out = lm.forward(inputs_embeds=torch.cat(parts, 1), use_cache=False, output_attentions=True,
                                 output_hidden_states=True)
        finally:
            lm.set_attn_implementation(implementation)
        order = torch.cat([torch.tensor([skip + P]), torch.arange(skip, skip + P)]).to(feats.device)
        self.captured = {"cls": {}, "keys": {}}
        for i in range(self.depth):
            self.captured["cls"][i] = out.attentions[i][:, :, -1, order].float()
            attn = lm.layers[i].self_attn
            k = attn.k_proj(lm.layers[i].input_layernorm(out.hidden_states[i]))
            k = k.view(n, k.shape[1], -1, attn.head_dim)
            if hasattr(attn, "k_norm"):
                k = attn.k_norm(k)
            self.captured["keys"][i] = k.flatten(2)[:, order]
        rows = torch.cat([token(self.summary_id), feats], 1)
        return BaseModelOutputWithPooling(last_hidden_state=rows, hidden_states=(rows,))

    def capture(self, pruner, layers: list[int], keys_layer: int | None) -> list:
        """ClsTower.capture: after each encoding, hand the requested rows to the pruner."""

        def hook(module, args, output):
            pruner.vision.setdefault("cls", {}).update({i: self.captured["cls"][i] for i in layers})
            if keys_layer is not None:
                pruner.vision["keys"] = self.captured["keys"][keys_layer]

        return [self.register_forward_hook(hook)]

    def cls_tower(self, outer: torch.nn.Module):
        from ..vision.families import ClsTower

        return ClsTower([], self.depth - 1, True, outer.multi_modal_projector, capture=self.capture)


def build_proxy_vlm(model_name: str, loaded=None, tower_depth: int | None = None):
    """(vlm, tokenizer): the embedded LLM's decoder and head (shared, not copied) inside a
    LlavaForConditionalGeneration whose vision tower is a `SummaryTower` over the first
    `tower_depth` decoder layers (default half of them) and whose projector is the identity;
    `loaded` = an already loaded (model, tokenizer)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from .. import models

    lm, tok = loaded if loaded is not None else models.load(model_name)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    cfg = LlavaConfig(vision_config=vision, text_config=lm.config, image_token_id=IMAGE_TOKEN_ID,
                      vision_feature_layer=0, vision_feature_select_strategy="default")
    with torch.device("meta"):
        vlm = LlavaForConditionalGeneration(cfg)
    vlm.model.language_model = lm.model
    vlm.lm_head = lm.lm_head
    depth = tower_depth or lm.config.num_hidden_layers // 2
    summary_id = tok("\n", add_special_tokens=False)["input_ids"][-1]
    vlm.model.vision_tower = SummaryTower(lm.model, summary_id, tok.bos_token_id, depth)
    vlm.model.multi_modal_projector = torch.nn.Identity()
    vlm.generation_config = lm.generation_config
    return vlm.eval(), tok


def image_inputs(method: str, feats: torch.Tensor) -> dict:
    """generate() kwargs handing one image over: through the SummaryTower for methods that read a
    [CLS], pre-encoded (the path 5.x generate uses anyway) for the others."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if method.split(":")[0] in CLS_METHODS:
        return {"pixel_values": feats[None]}
    return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=[feats])}}


def make_sample(rng: random.Random, tok, embed, n_patches: int, noise: float):
    """(animal, features [n_patches, H]) of one fake image."""
    animal = rng.choice(ANIMALS)
    words = [rng.choice(BACKGROUND) for _ in range(n_patches)]
    words[rng.randrange(n_patches)] = animal
    ids = torch.tensor([tok(w, add_special_tokens=False)["input_ids"][0] for w in words])
    with torch.no_grad():
        e = embed(ids)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return animal.strip(), e + noise * e.std() * torch.randn(e.shape, generator=g)


def prompt_ids(tok, n_patches: int) -> torch.Tensor:
    before, after = PROMPT.split("@@")
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ids = (bos + tok(before, add_special_tokens=False)["input_ids"] + [IMAGE_TOKEN_ID] * n_patches
           + tok(after, add_special_tokens=False)["input_ids"])
    return torch.tensor([ids])


def run_cell(vlm, tok, method: str, keep: float, samples: int, n_patches: int, noise: float, seed: int) -> dict:
    """Accuracy of one (method, keep) over `samples` fake images (the same images for every cell)."""
    import tokaccel

    rng = random.Random(seed)
    ids = prompt_ids(tok, n_patches)
    policy = None if method == "dense" else make_method(method, keep)
    if policy is not None:
        tokaccel.patch_model(vlm, policy=policy)
    correct, t0 = 0, time.perf_counter()
    try:
        for _ in range(samples):
            animal, feats = make_sample(rng, tok, vlm.get_input_embeddings(), n_patches, noise)
            with torch.no_grad():
                out = vlm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                   do_sample=False, **image_inputs(method, feats))
            answer = tok.decode(out[0, ids.shape[1]:]).lower()
            correct += bool(re.search(rf"\b{animal}\b", answer))
        kept = tokaccel.stats(vlm)["vision_image_tokens_kept"] / samples if policy is not None else n_patches
    finally:
        if policy is not None:
            tokaccel.unpatch_model(vlm)
    return {"method": method, "keep": keep, "kept_tokens_per_image": kept, "accuracy": correct / samples,
            "samples": samples, "seconds": round(time.perf_counter() - t0, 1)}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dense = [r for r in rows if r["method"] == "dense"]
    for method in sorted({r["method"] for r in rows} - {"dense"}):
        pts = sorted((r["keep"], r["accuracy"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=method)
    if dense:
        ax.axhline(100 * dense[0]["accuracy"], color="k", ls="--", label="dense (all 64 tokens)")
    ax.set_xscale("log")
    ax.set_xlabel("kept share of image tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PROVENANCE = ("timestamp", "device_name", "threads", "torch", "transformers", "git_commit", "git_dirty")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--methods", default=";".join(DEFAULT_METHODS), help="policy names or specs, ;-separated")
    p.add_argument("--keeps", default="0.05,0.1,0.25,0.5")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--patches", type=int, default=64)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/vision")
    args = p.parse_args(argv)
    from tqdm import tqdm

    from ..bench.results import run_metadata

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.out) / f"proxy_{args.model}_p{args.patches}_noise{args.noise}_n{args.samples}_seed{args.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    results_path = folder / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["method"], r["keep"]) for r in rows}
    cells = [("dense", 1.0)] + [(m, float(k)) for m in args.methods.split(";") for k in args.keeps.split(",")]
    todo = [c for c in cells if c not in done]
    if todo:
        vlm, tok = build_proxy_vlm(args.model)
        meta = run_metadata("cpu")  # each cell records the code and machine it was measured with
        for method, keep in tqdm(todo, desc="proxy eval"):
            row = run_cell(vlm, tok, method, keep, args.samples, args.patches, args.noise, args.seed)
            rows.append({**row, **{k: meta[k] for k in PROVENANCE}})
            results_path.write_text(json.dumps(rows, indent=1))
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, folder / "accuracy_vs_keep.png",
         f"proxy (word-embedding images), {args.model}, {args.patches} patches, noise {args.noise}, "
         f"{args.samples} samples")
    for r in rows:
        logger.info("%s keep=%s: %.3f", r["method"], r["keep"], r["accuracy"])
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
