"""Perplexity on long text: the next-token NLL of the last `eval_len` tokens of a document after
the model has read the `context_len` tokens before them, with or without a policy.

The context is prefilled in chunks (bounded memory); the evaluated tokens are then fed
`eval_chunk` at a time (1 = decode mode, each token one step, which is what a decode-time
policy acts on). Log-probabilities are taken in float32, so tiny or low-precision models give
finite, comparable numbers.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from ..validation import invalid, is_int
from .decoding import forward_tokens, prefill


def _model_vocab(model) -> int | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


@torch.no_grad()
def perplexity_ids(model, ids: list[int], eval_len: int, chunk: int | None = 2048, eval_chunk: int = 1,
                   prefill_context=None) -> dict:
    """NLL of ids[-eval_len:] given everything before them, on the model as it is (patched or not).
    `prefill_context(model)` (optional) wraps the context prefill, e.g. a kvpress press."""
    if not (is_int(eval_len) and 0 < eval_len < len(ids)):
        raise invalid("perplexity", "eval_len", eval_len, f"expected an integer in [1, {len(ids) - 1}] "
                                                          "(the document needs context before the scored part)")
    vocab = _model_vocab(model)
    if vocab is not None and max(ids) >= vocab:
        raise ValueError(f"token id {max(ids)} is outside the model's vocabulary ({vocab}); tokenizer and model do not match")
    n_ctx = len(ids) - eval_len
    started = time.perf_counter()
    with prefill_context(model) if prefill_context else contextlib.nullcontext():
        cache, logits = prefill(model, ids[:n_ctx], chunk=chunk)
    prefill_s = time.perf_counter() - started
    targets = torch.tensor(ids[n_ctx:], device=logits.device)
    nll = [-torch.log_softmax(logits.float(), -1)[targets[0]]]
    pos, step = n_ctx, max(1, int(eval_chunk))
    while pos < len(ids) - 1:
        piece = ids[pos : min(pos + step, len(ids) - 1)]
        cache, out = forward_tokens(model, piece, cache, pos, logits_to_keep=len(piece))
        logp = torch.log_softmax(out.float(), -1)
        nll.append(-logp.gather(-1, targets[pos - n_ctx + 1 : pos - n_ctx + 1 + len(piece)].unsqueeze(-1)).squeeze(-1))
        pos += len(piece)
    values = torch.cat([v.reshape(-1) for v in nll])
    mean = float(values.mean())
    return {"nll": mean, "ppl": math.exp(mean), "eval_len": eval_len, "context_len": n_ctx,
            "prefill_s": prefill_s, "total_s": time.perf_counter() - started}


def perplexity(model, tokenizer, text: str, context_len: int, eval_len: int, policy=None,
               chunk: int | None = 2048, eval_chunk: int = 1) -> dict:
    """Perplexity of tokens [context_len, context_len + eval_len) of `text` (tokenized with the
    tokenizer's special tokens, e.g. BOS) after reading the first `context_len` tokens.

    policy=None scores the model as it is; a policy (name, spec or Policy) patches the model for
    this call only. Returns {"nll", "ppl", "eval_len", "context_len", "prefill_s", "total_s"}."""
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) < context_len + eval_len:
        raise ValueError(f"the text has {len(ids)} tokens; context_len + eval_len = {context_len + eval_len}")
    ids = ids[: context_len + eval_len]
    if policy is None:
        return perplexity_ids(model, ids, eval_len, chunk, eval_chunk)
    import tokaccel

    with tokaccel.patched(model, policy):
        return perplexity_ids(model, ids, eval_len, chunk, eval_chunk)


def compare_perplexity(model, tokenizer, text: str, context_len: int, eval_len: int, policy,
                       chunk: int | None = 2048, eval_chunk: int = 1) -> dict:
    """{"dense": ..., "policy": ..., "delta_nll": policy NLL - dense NLL} on the same tokens."""
    dense = perplexity(model, tokenizer, text, context_len, eval_len, None, chunk, eval_chunk)
    patched = perplexity(model, tokenizer, text, context_len, eval_len, policy, chunk, eval_chunk)
    return {"dense": dense, "policy": patched, "delta_nll": patched["nll"] - dense["nll"]}
