"""The patching API: exactness of the dense policy, exact restore, errors, per-model policies."""

import inspect
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import tokaccel
from tokaccel.policies import Dense, Policy
from tokaccel.policies.dense import dense_attention

from testkit.models import tiny_model

PROMPTS = ["The quick brown fox jumps over the lazy dog because it wanted to see", "Paris is"]


def _padded_batch(tokenizer):
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any(), "the test needs a padded row"
    return batch


@torch.no_grad()
def _prefill_and_decode(model, batch, steps=8):
    """Logits of the prefill and of `steps` greedy decode steps (one tensor per step) + tokens."""
    out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return model(**batch).logits, torch.stack(out.logits), out.sequences


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_dense_equals_unpatched_on_real_models(name, request):
    model, tokenizer = request.getfixturevalue(name)
    batch = _padded_batch(tokenizer)
    ref_prefill, ref_steps, ref_tokens = _prefill_and_decode(model, batch)
    with tokaccel.patched(model, policy="dense"):
        prefill, steps, tokens = _prefill_and_decode(model, batch)
        counters = tokaccel.stats(model)
    assert (prefill - ref_prefill).abs().max() <= 1e-5
    assert (steps - ref_steps).abs().max() <= 1e-5
    assert torch.equal(tokens, ref_tokens)
    assert counters["calls"] > 0 and counters["keys_read"] > 0


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma3"])
def test_dense_equals_unpatched_on_tiny_models(kind):
    model = tiny_model(kind)
    input_ids = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :7] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    ref = _prefill_and_decode(model, batch)
    with tokaccel.patched(model, "dense"):
        got = _prefill_and_decode(model, batch)
    assert (got[0] - ref[0]).abs().max() <= 1e-5
    assert (got[1] - ref[1]).abs().max() <= 1e-5
    assert torch.equal(got[2], ref[2])


def test_unpatch_restores_bit_identical_logits(smollm2):
    model, tokenizer = smollm2
    batch = _padded_batch(tokenizer)
    impl_before = model.config._attn_implementation
    with torch.no_grad():
        before = model(**batch).logits
        tokaccel.patch_model(model, "dense")
        assert model.config._attn_implementation == "tokaccel"
        tokaccel.unpatch_model(model)
        after = model(**batch).logits
        tokaccel.patch_model(model, policy=Dense(backend="sdpa"))  # patch -> unpatch -> patch
        again = model(**batch).logits
        tokaccel.unpatch_model(model)
    assert torch.equal(before, after)
    assert (again - before).abs().max() <= 1e-5
    assert model.config._attn_implementation == impl_before
    assert tokaccel.get_policy(model) is None
    assert not any("_tokaccel_ctx" in m.__dict__ for m in model.modules())


def test_patched_context_restores_on_error():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="boom"):
        with tokaccel.patched(model, "dense"):
            assert tokaccel.get_policy(model).name == "dense"
            raise RuntimeError("boom")
    assert tokaccel.get_policy(model) is None
    assert model.config._attn_implementation == "sdpa"


@dataclass
class LastKeysOnly(Policy):
    """Test policy: each query reads only the newest `window` keys (no causal mask: decode only)."""

    name: ClassVar[str] = "last-keys"
    window: int = 2
    calls: ClassVar[list] = []

    def attend(self, ctx, module, query, key, value, attention_mask, **kwargs):
        LastKeysOnly.calls.append(ctx.info.layer_idx)
        key, value = key[:, :, -self.window:], value[:, :, -self.window:]
        return dense_attention(module, query, key, value, None, **kwargs)


def test_two_models_carry_different_policies():
    model_a, model_b = tiny_model(), tiny_model()  # same seed: same weights
    input_ids = torch.randint(1, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model_a(input_ids).logits
        tokaccel.patch_model(model_a, "dense")
        tokaccel.patch_model(model_b, LastKeysOnly(window=1))
        try:
            dense_out = model_a(input_ids).logits
            windowed = model_b(input_ids).logits
        finally:
            tokaccel.unpatch_model(model_a)
            tokaccel.unpatch_model(model_b)
    assert torch.equal(dense_out, ref)
    assert (windowed - ref).abs().max() > 1e-3  # model_b really ran its own policy


def test_hybrid_model_policy_runs_on_global_layers_only():
    model = tiny_model("gemma3")  # layers 0,1 sliding, 2 global, 3,4 sliding, 5 global
    global_layers = [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]
    assert global_layers and len(global_layers) < model.config.num_hidden_layers
    LastKeysOnly.calls.clear()
    input_ids = torch.randint(1, 128, (1, 1))
    with torch.no_grad(), tokaccel.patched(model, LastKeysOnly(window=64)):
        model(input_ids)
        counters = tokaccel.stats(model)
    assert sorted(LastKeysOnly.calls) == global_layers
    assert counters["dense_calls"] == model.config.num_hidden_layers - len(global_layers)


def test_stats_count_reads():
    model = tiny_model()
    with torch.no_grad(), tokaccel.patched(model, "dense"):
        model(torch.randint(1, 128, (3, 10)))
        counters = tokaccel.stats(model)
        tokaccel.reset_stats(model)
        assert tokaccel.stats(model).get("calls", 0) == 0
    layers, kv_heads, head_dim = 2, 2, 16
    assert counters["calls"] == layers
    assert counters["query_tokens"] == layers * 3 * 10
    assert counters["keys_read"] == layers * 3 * 10
    assert counters["kv_bytes_read"] == layers * 2 * 3 * 10 * kv_heads * head_dim * 4


def test_policy_listing_and_specs():
    listing = tokaccel.policies()
    assert "dense" in listing and listing["dense"]
    assert tokaccel.policies.parse_spec("tokenselect:k=1024,theta=0.9,mode=compact,flag=true") == (
        "tokenselect", {"k": 1024, "theta": 0.9, "mode": "compact", "flag": True})
    assert tokaccel.make_policy("dense:backend=sdpa") == Dense(backend="sdpa")


def test_bad_input_errors(smollm2):
    model = smollm2[0]
    with pytest.raises(ValueError, match="unknown policy 'nope'.*valid policies: .*dense"):
        tokaccel.patch_model(model, "nope")
    with pytest.raises(ValueError, match="backend='x'.*auto"):
        tokaccel.patch_model(model, "dense", backend="x")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['k'\]"):
        tokaccel.patch_model(model, "dense", k=5)
    with pytest.raises(ValueError, match="instance"):
        tokaccel.patch_model(model, Dense(), backend="sdpa")
    with pytest.raises(ValueError, match="key=value"):
        tokaccel.make_policy("dense:backend")
    with pytest.raises(ValueError, match="flash-attn"):
        tokaccel.patch_model(model, "dense", backend="flash")  # fp32 on CPU
    with pytest.raises(ValueError, match="not patched"):
        tokaccel.unpatch_model(model)
    tokaccel.patch_model(model, "dense")
    try:
        with pytest.raises(ValueError, match="already patched"):
            tokaccel.patch_model(model, "dense")
    finally:
        tokaccel.unpatch_model(model)
    assert tokaccel.get_policy(model) is None


def test_unsupported_models_are_refused():
    from testkit.legacy_attention_model import LegacyModel

    with pytest.raises(NotImplementedError, match="LegacyAttention.*AttentionInterface"):
        tokaccel.patch_model(LegacyModel(), "dense")
    with pytest.raises(NotImplementedError, match="no decoder attention modules"):
        tokaccel.patch_model(torch.nn.Linear(4, 4), "dense")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        tokaccel.patch_model(object(), "dense")


def test_entry_refuses_unpatched_module():
    model = tiny_model()
    tokaccel.patch_model(model, "dense")
    tokaccel.unpatch_model(model)
    model.config._attn_implementation_internal = "tokaccel"  # set by hand, without patch_model
    with pytest.raises(RuntimeError, match="was not patched"):
        model(torch.randint(1, 128, (1, 4)))


def test_import_has_no_side_effects():
    code = (
        "import tokaccel, tokaccel.models, tokaccel.cli\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "assert 'tokaccel' not in AttentionInterface._global_mapping\n"
        "assert 'tokaccel' not in AttentionMaskInterface._global_mapping\n"
        "print('clean')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "clean" in result.stdout


def test_cache_argument_under_both_transformers_names():
    """transformers 5.24 renamed `past_key_values` to `cache` (forward argument and output field);
    tokaccel reads either and passes the name the installed model takes."""
    from types import SimpleNamespace

    from tokaccel.cache import cache_kwarg, call_cache, output_cache

    old, new = object(), object()
    assert call_cache({"past_key_values": old}) is old and call_cache({"cache": new}) is new
    assert call_cache({"cache": None, "past_key_values": old}) is old and call_cache({}) is None
    assert output_cache(SimpleNamespace(past_key_values=old)) is old
    assert output_cache(SimpleNamespace(cache=new, past_key_values=old)) is new

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            return input_ids

    assert cache_kwarg(Old()) == "past_key_values" and cache_kwarg(New()) == "cache"
    model = tiny_model("llama")
    assert cache_kwarg(model) in inspect.signature(model.forward).parameters


def test_patch_state_is_the_one_reader_of_the_patch_attribute():
    """patch_state gives what patch_model installed (None when unpatched); no other module of the
    library reads the attribute by its name."""
    from pathlib import Path

    model = tiny_model()
    assert tokaccel.patch_state(model) is None
    with tokaccel.patched(model, "dense"):
        state = tokaccel.patch_state(model)
        assert state.policy is tokaccel.get_policy(model) and len(state.contexts) == 2
    assert tokaccel.patch_state(model) is None
    package = Path(tokaccel.__file__).parent
    readers = [p.relative_to(package) for p in package.rglob("*.py")
               if p.name != "patch.py" and "_tokaccel_patch" in p.read_text(encoding="utf-8")]
    assert readers == []
