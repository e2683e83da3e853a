"""Perplexity on long text: dense-patched equals unpatched; chunking does not change the numbers."""

import math

import pytest
import torch

from tokaccel.evals import compare_perplexity, perplexity, perplexity_ids
from tokaccel.evals.haystack import essay_sentences

TEXT = " ".join(essay_sentences()[:60])


def test_dense_patched_equals_unpatched(smol):
    model, tok = smol
    compared = compare_perplexity(model, tok, TEXT, 120, 16, "dense", eval_chunk=4)
    plain, dense = compared["dense"], compared["policy"]
    assert 1.0 < plain["ppl"] < 1000 and plain["eval_len"] == 16 and plain["context_len"] == 120
    assert dense["nll"] == pytest.approx(plain["nll"], abs=1e-6) and abs(compared["delta_nll"]) < 1e-6
    assert plain["ppl"] == pytest.approx(math.exp(plain["nll"]))
    from tokaccel import get_policy

    assert get_policy(model) is None  # patched only for the call


def test_chunking_does_not_change_the_nll(smol):
    model, tok = smol
    ids = tok(TEXT)["input_ids"][:120]
    whole = perplexity_ids(model, ids, 12, chunk=None, eval_chunk=12)
    chunked = perplexity_ids(model, ids, 12, chunk=40, eval_chunk=1)  # decode mode: one token per step
    assert chunked["nll"] == pytest.approx(whole["nll"], abs=1e-4)
    # the same number from a single full forward pass
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[-13:-1], -1)
    reference = -logp.gather(-1, torch.tensor(ids[-12:]).unsqueeze(-1)).mean()
    assert whole["nll"] == pytest.approx(float(reference), abs=1e-4)


def test_tiny_random_model_and_errors(smol):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    result = perplexity_ids(tiny, [i % 120 for i in range(300)], 50, chunk=64, eval_chunk=7)
    assert math.isfinite(result["nll"]) and 20 < result["ppl"] < 1000  # near-uniform over 128 tokens
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        perplexity_ids(tiny, [500, 1, 2, 3], 2)
    with pytest.raises(ValueError, match="eval_len"):
        perplexity_ids(tiny, [1, 2, 3], 3)
    model, tok = smol
    with pytest.raises(ValueError, match="tokens; context_len"):
        perplexity(model, tok, "too short", 100, 20)
