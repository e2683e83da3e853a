"""Packed CPU linears (tokaccel.cpu_linear): same outputs as nn.Linear, fallbacks whenever the
packed copy could be stale or unusable, exact restoration, clear errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tokaccel.recycling as R
from testkit.models import tiny_model
from tokaccel.cpu_linear import PackedLinear, available, pack_linears, packed_count, packed_linears, unpack_linears

pytestmark = pytest.mark.skipif(not available(), reason="torch built without oneDNN packed linears")


def _linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_packed_model_matches_and_unpacks_exactly():
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(1, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect = model(ids).logits
        assert pack_linears(model) == len(_linears(model)) == 2 * 7 + 1
        assert all(type(m) is PackedLinear for m in _linears(model))
        got = model(ids).logits
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    assert unpack_linears(model) == 15 and packed_count(model) == 0
    assert all(type(m) is nn.Linear and not hasattr(m, "_tokaccel_packed") for m in _linears(model))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_greedy_generate_and_recycling_on_a_packed_model():
    """Same greedy tokens packed or not; Token Recycling on a packed model equals greedy on it, and
    its tree-size calibration is kept apart from the unpacked model's."""
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    kw = dict(do_sample=False, max_new_tokens=24, eos_token_id=None)
    plain = model.generate(ids, **kw)
    key_plain = R.calibration_key(model, torch.device("cpu"))
    with packed_linears(model):
        assert packed_count(model) == 15
        assert torch.equal(model.generate(ids, **kw), plain)
        assert torch.equal(model.generate(ids, custom_generate=R.generate, tree="paper", **kw), plain)
        assert R.calibration_key(model, torch.device("cpu")) != key_plain
    assert packed_count(model) == 0


def test_falls_back_to_f_linear_when_the_packed_copy_is_unusable():
    torch.manual_seed(0)
    layer = nn.Linear(32, 48)
    x = torch.randn(3, 5, 32)
    pack_linears(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert layer._packed_usable(x)
        layer.weight.mul_(2)  # in-place update after packing: the packed copy is stale
        assert not layer._packed_usable(x)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.weight = nn.Parameter(torch.randn(48, 32))  # new storage
        assert not layer._packed_usable(x)
        assert not layer._packed_usable(x.double())  # another input dtype: F.linear (and its error)
    # autograd: the packed op has no backward, so the graph goes through F.linear
    layer._pack()
    out = layer(x)
    out.sum().backward()
    assert layer.weight.grad is not None and torch.equal(layer.weight.grad, x.reshape(-1, 32).sum(0).expand(48, 32))


def test_bf16_packing_matches():
    torch.manual_seed(0)
    layer = nn.Linear(64, 96, dtype=torch.bfloat16)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    expect = F.linear(x, layer.weight, layer.bias)
    try:
        pack_linears(layer)
    except ValueError as err:  # oneDNN needs avx512_bf16 / AMX for a bf16 packed weight
        pytest.skip(f"no bf16 packing on this CPU: {err}")
    with torch.no_grad():
        torch.testing.assert_close(layer(x).float(), expect.float(), rtol=2e-2, atol=2e-2)


def test_context_manager_keeps_earlier_packing_and_errors_are_clear():
    model = tiny_model("llama")
    pack_linears(model.lm_head)
    with packed_linears(model):
        assert packed_count(model) == 15
    assert packed_count(model) == 1 and type(model.lm_head) is PackedLinear
    assert pack_linears(model) == 15  # packing twice is harmless
    unpack_linears(model)
    with pytest.raises(ValueError, match=r"no linear layer can be packed \(.*float16"):
        pack_linears(tiny_model("llama").half())
    with pytest.raises(ValueError, match="the model has no nn.Linear"):
        pack_linears(nn.Sequential(nn.ReLU()))


def test_recycling_on_packed_smollm2_equals_greedy(smollm2, tmp_path, monkeypatch):
    """The configuration the speed claims use: SmolLM2 packed, the automatic tree choice (and a
    fixed 8-node tree); tokens equal packed greedy and unpacked greedy, drafts are accepted."""
    from tokaccel.bench.spec_prompts import PROMPTS
    from tokaccel.bench.speculative import encode

    monkeypatch.setenv("TOKACCEL_CACHE", str(tmp_path))
    model, tokenizer = smollm2
    R.reset(model)
    prompts = [PROMPTS["chat"][1], PROMPTS["code"][2], PROMPTS["repetitive"][3]]
    encoded = [encode(tokenizer, text, "cpu") for text in prompts]
    kw = dict(do_sample=False, max_new_tokens=40)
    plain = [model.generate(ids, **kw) for ids in encoded]
    with packed_linears(model):
        for ids, expect in zip(encoded, plain):
            assert torch.equal(model.generate(ids, **kw), expect)
            assert torch.equal(model.generate(ids, custom_generate=R.generate, **kw), expect)
            # the automatic choice may settle on plain steps; a fixed tree must accept drafts
            assert torch.equal(model.generate(ids, custom_generate=R.generate, tree=8, **kw), expect)
        assert R.recycling_state(model).stats.summary()["accepted"] > 0
    assert packed_count(model) == 0
    R.reset(model)


def test_recycling_warns_on_a_large_unpacked_cpu_model_only(tmp_path, monkeypatch):
    """A linear of >= 2^20 weights (here a 16384-token head) unpacked: one hint to pack; packed, or
    a small model: none."""
    import warnings

    monkeypatch.setenv("TOKACCEL_CACHE", str(tmp_path))
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(custom_generate=R.generate, do_sample=False, max_new_tokens=4, eos_token_id=None, tree=4)
    large = tiny_model("llama", vocab_size=16384)
    with pytest.warns(UserWarning, match=r"tokaccel.pack_linears\(model\)"):
        large.generate(ids, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*pack_linears")
        tiny_model("llama").generate(ids, **kw)  # small: no hint
        with packed_linears(large):
            large.generate(ids, **kw)  # packed: no hint
