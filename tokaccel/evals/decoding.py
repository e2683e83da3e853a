"""Chunked prefill and greedy decoding with explicit positions, shared by the runner and perplexity.

Positions are passed explicitly (`position_ids = start + i`), so a cache that a policy or a peer
(kvpress) shrank during prefill still decodes at the tokens' true positions. For a dense cache
the result is token-identical to `model.generate(do_sample=False)` (tested).
"""

from __future__ import annotations

import torch

from ..cache import cache_kwarg, output_cache


def _device(model) -> torch.device:
    return next(model.parameters()).device


def forward_tokens(model, ids: list[int], cache, start: int, logits_to_keep: int = 1):
    device = _device(model)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    position_ids = torch.arange(start, start + len(ids), device=device).unsqueeze(0)
    out = model(input_ids=input_ids, position_ids=position_ids, use_cache=True, logits_to_keep=logits_to_keep,
                **{cache_kwarg(model): cache})
    return output_cache(out), out.logits[0]


@torch.no_grad()
def prefill(model, ids: list[int], cache=None, start: int = 0, chunk: int | None = 2048):
    """Run `ids` (positions start, start+1, ...) through the model, `chunk` tokens per forward
    (None: one forward). Returns (cache, logits of the last token as float32 [vocab])."""
    if not ids:
        raise ValueError("prefill needs at least one token")
    step = chunk or len(ids)
    logits = None
    for s in range(0, len(ids), step):
        cache, logits = forward_tokens(model, ids[s : s + step], cache, start + s)
    return cache, logits[-1].float()


def eos_ids(model, tokenizer=None) -> set[int]:
    """Token ids that end generation: the generation config's EOS (int or list) and the tokenizer's."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in eos if isinstance(eos, (list, tuple)) else [eos]:
        if value is not None:
            ids.add(int(value))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@torch.no_grad()
def greedy(model, cache, ids: list[int], start: int, max_new_tokens: int, stop_ids: set[int] = frozenset(),
           chunk: int | None = 2048, first_logits: torch.Tensor | None = None) -> list[int]:
    """Feed `ids` after a prefilled `cache` (they sit at positions start, start+1, ...), then pick
    the argmax token `max_new_tokens` times, stopping after a token in `stop_ids`. With empty
    `ids`, `first_logits` (the prefill's last logits) choose the first token. Mutates `cache`."""
    if ids:
        cache, logits = prefill(model, ids, cache, start, chunk)
    elif first_logits is not None:
        logits = first_logits
    else:
        raise ValueError("greedy needs ids or first_logits")
    pos = start + len(ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        out.append(token)
        if token in stop_ids or len(out) == max_new_tokens:
            break
        cache, step_logits = forward_tokens(model, [token], cache, pos)
        logits = step_logits[-1]
        pos += 1
    return out
