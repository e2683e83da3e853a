"""Manual references for pruned VLM decoding, built from the unpatched model's own pieces."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def decoder_inputs(model, inputs) -> dict:
    """What the text decoder receives at prefill inside the unpatched model's `generate`:
    inputs_embeds [B, L, H] (image features merged), attention_mask [B, L], position_ids."""
    text_model = getattr(model.model, "language_model", None) or model.model.text_model
    captured = {}

    def hook(module, args, kwargs):
        if not captured:
            captured.update({k: kwargs.get(k) for k in ("inputs_embeds", "attention_mask", "position_ids")})

    handle = text_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        handle.remove()
    return captured


def kept_columns(image: torch.Tensor, selection: list[list[int]]) -> list[list[int]]:
    """Original columns kept per row: every non-image column, plus the selected offsets of each
    image (images numbered batch-major in prompt order, as `last_selection` reports them)."""
    rows, s = [], 0
    for b in range(image.shape[0]):
        cols, j, L = [], 0, image.shape[1]
        while j < L:
            if not image[b, j]:
                cols.append(j)
                j += 1
                continue
            start = j
            while j < L and image[b, j]:
                j += 1
            cols += [start + o for o in selection[s]]
            s += 1
        rows.append(cols)
    return rows


def greedy_on_kept(model, dec: dict, cols: list[list[int]], steps: int) -> torch.Tensor:
    """Greedy tokens [B, steps] of the unpatched text decoder + lm_head fed only the kept rows
    (left-padded per row) at their original positions; new tokens continue the original positions."""
    text_model = getattr(model.model, "language_model", None) or model.model.text_model
    embed = model.get_input_embeddings()
    x, mask, pos = dec["inputs_embeds"], dec["attention_mask"], dec["position_ids"]
    B, L = mask.shape
    if pos is None:
        pos = torch.arange(L)[None].expand(B, L)
    n = max(map(len, cols))
    idx = torch.tensor([[0] * (n - len(c)) + c for c in cols])
    filled = torch.tensor([[False] * (n - len(c)) + [True] * len(c) for c in cols])
    xs = torch.where(filled[..., None], x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])), 0.0)
    m = (mask.gather(1, idx).bool() & filled).long()
    if pos.dim() == 2:
        p = pos.gather(1, idx)
    else:
        p = pos.gather(2, idx[None].expand(pos.shape[0], -1, -1))
    last_pos = pos[..., -1:]
    cache = DynamicCache(config=text_model.config)
    out = []
    with torch.no_grad():
        for t in range(steps):
            h = text_model(inputs_embeds=xs, attention_mask=m, position_ids=p, cache=cache, use_cache=True)
            tok = model.lm_head(h.last_hidden_state[:, -1]).argmax(-1)
            out.append(tok)
            xs = embed(tok[:, None])
            m = torch.cat([m, torch.ones(B, 1, dtype=m.dtype)], 1)
            p = last_pos + 1 + t
    return torch.stack(out, 1)


def fastv_layerwise(model, dec: dict, cols: list[int], layer: int, steps: int) -> torch.Tensor:
    """Greedy tokens [1, steps] of a batch-1, unpadded prompt where decoder layers >= `layer` see only
    the kept rows `cols` (layers before see all), by calling the unpatched decoder layers one by one."""
    text_model = getattr(model.model, "language_model", None) or model.model.text_model
    x, pos = dec["inputs_embeds"], dec["position_ids"]
    L = x.shape[1]
    if pos is None:
        pos = torch.arange(L)[None]
    keep = torch.tensor(cols)
    cache = DynamicCache(config=text_model.config)
    out = []
    with torch.no_grad():
        for t in range(steps):
            rot_pos = pos if pos.dim() == 2 or pos.shape[0] == 3 else pos[1:]
            cos, sin = text_model.rotary_emb(x, rot_pos)
            h = x
            for i, dl in enumerate(text_model.layers):
                if i == layer and t == 0:
                    h, cos, sin = h[:, keep], cos[:, keep], sin[:, keep]
                h = dl(h, attention_mask=None, position_embeddings=(cos, sin), cache=cache, use_cache=True)
            tok = model.lm_head(text_model.norm(h)[:, -1]).argmax(-1)
            out.append(tok)
            x = model.get_input_embeddings()(tok[:, None])
            pos = pos[..., -1:] + 1
    return torch.stack(out, 1)
