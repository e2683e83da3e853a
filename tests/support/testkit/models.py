"""Helpers shared by the tests: tiny random-weight causal LMs (exactness and shape tests), padded
batches, generate wrappers, the passkey prompt, Token Recycling's greedy / recycled calls."""

import torch

import tokaccel.recycling as R


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


def padded_batch(length=40, pad=9, seed=1):
    input_ids = torch.randint(1, 128, (2, length), generator=torch.Generator().manual_seed(seed))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :pad] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def run_generate(model, batch, steps=6, forward=True):
    """Prefill logits of a plain forward (None if not `forward`), per-step logits of generate
    [steps, B, V], the generated tokens, and generate's cache."""
    out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    prefill = model(**batch).logits if forward else None
    return prefill, torch.stack(out.logits), out.sequences, out.past_key_values


def passkey_ids(tokenizer, n_tokens, depth, key):
    """A chat prompt of ~n_tokens: filler with the pass key at `depth`, answer prefix included."""
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    reps = (n_tokens - 60) // len(tokenizer(filler, add_special_tokens=False)["input_ids"])
    at = int(reps * depth)
    text = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will "
            "quiz you about the important information there.\n" + filler * at
            + f"The pass key is {key}. Remember it. {key} is the pass key. " + filler * (reps - at))
    messages = [{"role": "user", "content": text + "\nWhat is the pass key?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(prompt + "The pass key is", return_tensors="pt", add_special_tokens=False)


def random_prompts(n, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (1, 5 + 3 * i), generator=g) for i in range(n)]


def greedy(model, ids, **kw):
    return model.generate(ids, **{"do_sample": False, **kw})


def recycled(model, ids, **kw):
    return model.generate(ids, custom_generate=R.generate, **{"do_sample": False, **kw})
