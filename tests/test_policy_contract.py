"""Every registered policy through one matrix: exact (fp32 logits within 1e-4 of the unpatched
model) on a left-padded batch of 2 when its budget covers the context, a clear ValueError for a
budget <= 0 and for an unknown option, and bit-identical logits after unpatching. A policy added
to the registry without a row here fails `test_every_registered_policy_has_a_contract_row`."""

import functools

import pytest
import torch
from testkit.models import padded_batch, run_generate, tiny_model
from testkit.tiny_vlms import BUILDERS

import tokaccel
from tokaccel.calibrate import calibrate_fasa
from tokaccel.registry import REGISTRY

SELECTION = dict(k=64, n_init=4, n_local=8, chunk=16)  # 76 keys: covers the 40 + 6 tokens below
TEXT = {  # name -> (options whose budget covers the context, options with a budget <= 0)
    "dense": ({}, None),
    "tokenselect": (SELECTION, {"k": 0}),
    "hisa": (SELECTION, {"k": 0}),
    "quest": (SELECTION, {"k": 0}),
    "fasa": (SELECTION, {"k": 0}),
    "h2o": ({"budget": 64}, {"budget": 0}),
    "streamingllm": ({"budget": 64}, {"budget": 0}),
    "snapkv": ({"budget": 64}, {"budget": 0}),
}
VISION = {  # name -> (tiny VLM family, options besides keep)
    "divprune": ("llava", {}),
    "fastv": ("llava", {"layer": 1}),
    "vtc_cls": ("llava", {}),
    "visionzip": ("llava", {}),
    "mmr": ("qwen2_5_vl", {}),
    "todre": ("llava_next", {"late_keep": 1.0, "layer": 3}),
}


def _text_model():
    """A tiny 4-layer Llama: Quest keeps layers 0-1 dense and FASA layer 0, so both run somewhere."""
    return tiny_model("llama", num_hidden_layers=4)


@functools.lru_cache(maxsize=None)
def _fasa_calibration():
    g = torch.Generator().manual_seed(5)
    samples = [torch.randint(1, 128, (1, 64), generator=g) for _ in range(2)]
    return calibrate_fasa(_text_model(), samples, top_k=8, queries=8)


def _options(name: str, options: dict) -> dict:
    return {**options, "calibration": _fasa_calibration()} if name == "fasa" else dict(options)


def test_every_registered_policy_has_a_contract_row():
    assert set(REGISTRY) == set(TEXT) | set(VISION)


def _sparse_variants(name: str) -> list[dict]:
    """The policy's own path too where it would otherwise fall back to dense attention."""
    fields = REGISTRY[name].__dataclass_fields__
    return [{}, {"dense_fallback": False}] if "dense_fallback" in fields else [{}]


@pytest.mark.parametrize("name", sorted(TEXT))
def test_text_policy_contract(name):
    covering, bad = TEXT[name]
    model, batch = _text_model(), padded_batch()
    ref_prefill, ref_steps, ref_tokens, _ = run_generate(model, batch)
    for extra in _sparse_variants(name):
        with tokaccel.patched(model, name, **_options(name, {**covering, **extra})):
            prefill, steps, tokens, _ = run_generate(model, batch)
        torch.testing.assert_close(prefill, ref_prefill, rtol=0, atol=1e-4)
        torch.testing.assert_close(steps, ref_steps, rtol=0, atol=1e-4)
        assert torch.equal(tokens, ref_tokens)
    assert torch.equal(run_generate(model, batch)[0], ref_prefill)  # unpatched: bit-identical
    if bad is not None:
        with pytest.raises(ValueError):
            tokaccel.patch_model(model, name, **_options(name, {**covering, **bad}))
    with pytest.raises(ValueError, match="valid options"):
        tokaccel.patch_model(model, name, no_such_option=1)
    assert tokaccel.get_policy(model) is None


@pytest.mark.parametrize("name", sorted(VISION))
def test_vision_policy_contract(name):
    family, extra = VISION[name]
    model, inputs = BUILDERS[family]()
    assert inputs["attention_mask"].shape[0] == 2 and not inputs["attention_mask"].all()  # padded batch of 2

    def logits():
        with torch.no_grad():
            return model(**inputs).logits

    ref = logits()
    with tokaccel.patched(model, name, keep=1.0, **extra):
        torch.testing.assert_close(logits(), ref, rtol=0, atol=1e-4)
    assert torch.equal(logits(), ref)
    with pytest.raises(ValueError):
        tokaccel.patch_model(model, name, keep=0, **extra)
    with pytest.raises(ValueError, match="valid options"):
        tokaccel.patch_model(model, name, no_such_option=1)
    assert tokaccel.get_policy(model) is None
