"""Shared fixtures: the real embedded models (loaded once per session) and tiny random models."""

import pytest
import torch

import tokaccel
from tokaccel import models


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, fp32, CPU."""
    return models.load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3():
    """(model, tokenizer) of Gemma-3-270M, fp32, CPU."""
    return models.load("gemma3-270m")


@pytest.fixture(autouse=True)
def _never_leave_a_model_patched(request):
    """A test that fails mid-way must not leave a shared session model patched."""
    yield
    for name in ("smollm2", "gemma3"):
        if name in request.fixturenames:
            model = request.getfixturevalue(name)[0]
            if tokaccel.get_policy(model) is not None:
                tokaccel.unpatch_model(model)


def tiny_model(kind: str = "llama", **overrides):
    """A tiny random-weight causal LM (fp32, eval mode) for exactness and shape tests."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    if kind == "llama":
        config = LlamaConfig(**common)
    elif kind == "qwen2":
        config = Qwen2Config(**common)
    elif kind == "mistral":
        config = MistralConfig(**{**common, "sliding_window": 8})
    elif kind == "gemma3":
        config = Gemma3TextConfig(**{**common, "num_hidden_layers": 6, "num_key_value_heads": 1, "head_dim": 32,
                                     "sliding_window": 8, "sliding_window_pattern": 3})
    else:
        raise ValueError(kind)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
