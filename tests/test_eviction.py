"""KV eviction (H2O + A2SF, StreamingLLM, SnapKV): bounded cache, exactness, scores vs explicit
attention probabilities, padding, errors."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

import tokaccel
from tokaccel.cache import EvictionLayer, cache_kwarg, output_cache
from tokaccel.policies import H2O, SnapKV, StreamingLLM, make_policy

from testkit.models import tiny_model

POLICIES = ["h2o", "streamingllm", "snapkv"]


def _batch(length=40, pad=9, seed=1, rows=2):
    input_ids = torch.randint(1, 128, (rows, length), generator=torch.Generator().manual_seed(seed))
    attention_mask = torch.ones_like(input_ids)
    if rows > 1:
        attention_mask[1, :pad] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def _generate(model, batch, steps=6, **kwargs):
    return model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, **kwargs)


def _eviction_layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, EvictionLayer)]


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("policy", POLICIES)
def test_exact_when_budget_covers_context(kind, policy):
    """Budget >= prompt + generated tokens: nothing is evicted, logits equal dense (fp32, 1e-4),
    prefill and decode, batch 2 with left padding."""
    model, batch = tiny_model(kind), _batch()
    ref = _generate(model, batch)
    with tokaccel.patched(model, policy, budget=64):
        out = _generate(model, batch)
        counters = tokaccel.stats(model)
    assert (torch.stack(out.logits) - torch.stack(ref.logits)).abs().max() <= 1e-4
    assert torch.equal(out.sequences, ref.sequences)
    assert counters.get("evicted_tokens", 0) == 0
    assert _eviction_layers(output_cache(out))


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_exact_on_real_models(name, request):
    """The real SmolLM2 (GQA 3) and Gemma3 (MQA, D=256, only its 3 global layers evict): with a
    budget covering the context, every policy equals dense, batch 2 with left padding."""
    model, tokenizer = request.getfixturevalue(name)
    tokenizer.padding_side = "left"
    batch = tokenizer(["The quick brown fox jumps over the lazy dog because it wanted to see the", "Paris is"],
                      return_tensors="pt", padding=True)
    ref = _generate(model, batch, steps=3)
    for policy in POLICIES:
        with tokaccel.patched(model, policy, budget=64):
            out = _generate(model, batch, steps=3)
        assert (torch.stack(out.logits) - torch.stack(ref.logits)).abs().max() <= 1e-4, policy
        assert torch.equal(out.sequences, ref.sequences), policy
    assert len(_eviction_layers(output_cache(out))) == (3 if name == "gemma3" else 30)


def test_snapkv_keeps_the_needle_on_a_real_model(smollm2):
    """Real SmolLM2, a ~1.5K-token passkey prompt, 384 tokens kept per layer (26%): SnapKV's
    question-side vote keeps the pass key's tokens twice as often as a uniform pick would (measured
    0.51; layers 1-29: the first layer's attention is diffuse); StreamingLLM, sinks + newest
    tokens, keeps none of them."""
    from testkit.models import passkey_ids as _passkey_ids

    model, tokenizer = smollm2
    ids = _passkey_ids(tokenizer, 1500, 0.5, "15306")
    tokens = ids["input_ids"][0].tolist()
    key = tokenizer("15306", add_special_tokens=False)["input_ids"]
    needle = {s + j for s in range(len(tokens)) if tokens[s:s + len(key)] == key for j in range(len(key))}
    assert len(needle) == 10  # the key appears twice
    kept = {}
    for policy in ("snapkv", "streamingllm"):
        with torch.no_grad(), tokaccel.patched(model, policy, budget=384):
            cache = output_cache(model(**ids, use_cache=True))
        layers = _eviction_layers(cache)
        assert all(layer.stored == 384 for layer in layers)
        hits = [len(needle & set(row.tolist())) for layer in layers[1:] for row in layer.pos[0]]
        kept[policy] = sum(hits) / (len(hits) * len(needle))
    share = 384 / len(tokens)
    assert kept["snapkv"] >= 1.5 * share and kept["streamingllm"] == 0, (kept, share)


@pytest.mark.parametrize("policy", POLICIES)
def test_padded_batch_equals_each_row_alone(policy):
    """Eviction under left padding: padding is never kept or counted, so each row of a padded batch
    evicts what it would alone (same tokens, logits within 1e-4)."""
    model, batch = tiny_model("llama"), _batch(length=48, pad=11)
    with tokaccel.patched(model, policy, budget=20):
        together = _generate(model, batch, steps=8)
        for row in range(2):
            real = batch["attention_mask"][row].bool()
            alone = _generate(model, {"input_ids": batch["input_ids"][row:row + 1, real],
                                      "attention_mask": batch["attention_mask"][row:row + 1, real]}, steps=8)
            assert torch.equal(together.sequences[row, 48:], alone.sequences[0, int(real.sum()):])
            diff = torch.stack(together.logits)[:, row] - torch.stack(alone.logits)[:, 0]
            assert diff.abs().max() <= 1e-4


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("budget", [12, 0.25])
def test_stored_kv_never_exceeds_the_budget(policy, budget):
    """Checked after every forward of a 40-token generation from a 64-token prompt."""
    model, batch = tiny_model("gemma3"), _batch(length=64, pad=5)
    expected = budget if isinstance(budget, int) else round(budget * 64)
    seen = []

    def check(module, args, kwargs, output):
        for layer in _eviction_layers(output_cache(output)):
            assert layer.keys.shape[2] == layer.values.shape[2] == layer.stored <= expected
            seen.append(layer.stored)

    handle = model.register_forward_hook(check, with_kwargs=True)
    try:
        with tokaccel.patched(model, policy, budget=budget):
            out = _generate(model, batch, steps=40)
            counters = tokaccel.stats(model)
    finally:
        handle.remove()
    cache = output_cache(out)
    assert len(seen) == 40 * 2 and max(seen) == expected  # 2 global layers of 6
    assert cache.get_seq_length() == 64 + 40 - 1  # every token seen counts (the last one is not fed back)
    # per layer: row 0 drops 64 + 39 - budget real tokens, row 1 drops 5 fewer (its padding never counts)
    assert counters["evicted_tokens"] == 2 * (2 * (64 + 39 - expected) - 5)


def test_streamingllm_matches_a_masked_dense_reference():
    """StreamingLLM's decode steps equal the unpatched model on the whole sequence with a 4-D mask
    that lets each generated token see the sinks, the last budget - n_sink tokens (what the cache
    stores) and itself."""
    model, batch = tiny_model("llama"), _batch(rows=1, length=30)
    budget, n_sink, steps = 12, 4, 6
    with tokaccel.patched(model, "streamingllm", budget=budget, n_sink=n_sink):
        out = _generate(model, batch, steps=steps)
    seq = out.sequences[:, :-1]
    T, P = seq.shape[1], 30
    allowed = torch.ones(T, T).tril().bool()
    for t in range(P, T):  # the prompt's own attention is full; later rows see what the cache keeps
        allowed[t] = False
        allowed[t, :n_sink] = True
        allowed[t, t - (budget - n_sink):t + 1] = True
    mask = torch.zeros(1, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ref = model(input_ids=seq, attention_mask=mask).logits[0, P - 1:]
    assert (torch.stack(out.logits)[:, 0] - ref).abs().max() <= 1e-4


def _explicit_probs(model, input_ids, layer_idx):
    """Attention probabilities [H, T, T] of one layer from the eager implementation."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return out.attentions[layer_idx][0]


@pytest.mark.parametrize("alpha", [1.0, 0.9])
def test_h2o_scores_equal_explicit_attention_column_sums(alpha):
    """No eviction (budget >= sequence): each slot's accumulated score equals the sum over every
    query that saw it of alpha^(queries after it) * probability, mean over the G query heads."""
    model, batch = tiny_model("llama"), _batch(rows=1, length=25)
    with tokaccel.patched(model, "h2o", budget=64, alpha=alpha):
        out = _generate(model, batch, steps=5)
    seq = out.sequences[:, :-1]
    T = seq.shape[1]
    weight = alpha ** torch.arange(T - 1, -1, -1, dtype=torch.float32)
    for idx, layer in enumerate(output_cache(out).layers):
        probs = _explicit_probs(model, seq, idx)  # [H, T, T]
        expected = (probs * weight[None, :, None]).sum(1).reshape(2, 2, T).mean(1)  # [Hk, T]
        order = layer.pos[0].argsort(-1)
        assert torch.allclose(layer.score[0].gather(1, order), expected, atol=1e-5)


def test_h2o_keeps_heavy_hitters_and_recent_tokens():
    """After the prompt, each KV head keeps its `recent` newest tokens and the largest column sums."""
    model, batch = tiny_model("llama"), _batch(rows=1, length=40)
    budget, recent = 16, 6
    with tokaccel.patched(model, "h2o", budget=budget, recent=recent):
        with torch.no_grad():
            out = model(**batch, use_cache=True)
    for idx, layer in enumerate(output_cache(out).layers):
        colsum = _explicit_probs(model, batch["input_ids"], idx).sum(1).reshape(2, 2, 40).mean(1)  # [Hk, T]
        for hk in range(2):
            heavy = colsum[hk, :40 - recent].topk(budget - recent).indices
            expected = set(heavy.tolist()) | set(range(40 - recent, 40))
            assert set(layer.pos[0, hk].tolist()) == expected


def test_snapkv_keeps_the_window_and_the_pooled_votes():
    model, batch = tiny_model("llama"), _batch(rows=1, length=40)
    budget, window, kernel = 16, 8, 3
    with tokaccel.patched(model, "snapkv", budget=budget, window=window, kernel=kernel):
        with torch.no_grad():
            out = model(**batch, use_cache=True)
    for idx, layer in enumerate(output_cache(out).layers):
        probs = _explicit_probs(model, batch["input_ids"], idx)[:, -window:]  # [H, w, T]
        votes = probs.sum(1).reshape(2, 2, 40).mean(1)
        pooled = torch.nn.functional.avg_pool1d(votes[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
        for hk in range(2):
            top = pooled[hk, :40 - window].topk(budget - window).indices
            assert set(layer.pos[0, hk].tolist()) == set(top.tolist()) | set(range(40 - window, 40))


def test_chunked_prompt_then_decoding():
    """A prompt fed in two forwards (the second with the cache) is compressed after each, then
    decoding goes on from that cache: within the budget, every token counted as seen, no NaN."""
    model, batch = tiny_model("qwen2"), _batch(rows=1, length=50)
    ids = batch["input_ids"]
    with tokaccel.patched(model, "h2o", budget=16), torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :30], **{cache_kwarg(model): cache}, use_cache=True)
        assert all(layer.stored == 16 and layer.seen == 30 for layer in _eviction_layers(cache))
        logits = model(input_ids=ids[:, 30:], **{cache_kwarg(model): cache}, use_cache=True).logits
        for _ in range(5):
            assert torch.isfinite(logits).all()
            logits = model(input_ids=logits[:, -1:].argmax(-1), **{cache_kwarg(model): cache}, use_cache=True).logits
    assert all(layer.stored == 16 and layer.seen == 55 for layer in _eviction_layers(cache))


# ----------------------------------------------------------------------------- memory and errors


def test_memory_is_bounded():
    """The cache's bytes stay at the budget's (plus one spare decode slot) whatever the context."""
    model, batch = tiny_model("llama"), _batch(rows=1, length=200)
    with tokaccel.patched(model, "streamingllm", budget=32):
        out = _generate(model, batch, steps=4)
    for layer in _eviction_layers(output_cache(out)):
        kv = 2 * 1 * 2 * 33 * 16 * 4  # K and V, 1 row, 2 KV heads, 33 slots, D 16, fp32
        assert kv < layer.allocated_bytes() <= kv + 33 * 2 * (8 + 1 + 4)  # + pos, valid, score per slot


@pytest.mark.parametrize("config, match", [
    (dict(policy="h2o", budget=0), "budget=0"),
    (dict(policy="h2o", budget=1.5), "budget=1.5"),
    (dict(policy="h2o", budget=True), "budget=True"),
    (dict(policy="h2o", alpha=0), "alpha=0"),
    (dict(policy="h2o", recent=-1), "recent=-1"),
    (dict(policy="snapkv", kernel=4), "kernel=4"),
    (dict(policy="snapkv", window=0), "window=0"),
    (dict(policy="streamingllm", budget=4, n_sink=4), "no window"),
    (dict(policy="streamingllm", size=3), "unknown option"),
])
def test_bad_config_is_refused(config, match):
    policy = config.pop("policy")
    with pytest.raises(ValueError, match=match):
        make_policy(policy, **config)


def test_registry_and_defaults():
    assert {"h2o", "snapkv", "streamingllm"} <= set(tokaccel.policies())
    assert H2O().budget == 2048 and H2O().recent == 0.5 and H2O().alpha == 1.0
    assert SnapKV().window == 32 and SnapKV().kernel == 5 and StreamingLLM().n_sink == 4


def test_unsupported_uses_are_refused():
    model, batch = tiny_model("llama"), _batch(rows=1)
    with tokaccel.patched(model, "h2o", budget=16):
        with pytest.raises(ValueError, match="StaticLayer"):
            cache = StaticCache(config=model.config, max_cache_len=64)
            with torch.no_grad():
                model(**batch, **{cache_kwarg(model): cache}, use_cache=True)
        with pytest.raises(ValueError, match="cropped"):  # HF reads EvictionLayer.is_croppable = False
            with torch.no_grad():
                model.generate(**batch, max_new_tokens=4, do_sample=False, prompt_lookup_num_tokens=3)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        EvictionLayer(8).crop(-1)


def test_unpatch_restores_the_model():
    model, batch = tiny_model("llama"), _batch()
    with torch.no_grad():
        before = model(**batch).logits
        with tokaccel.patched(model, "snapkv", budget=8):
            model(**batch)
        after = model(**batch).logits
    assert torch.equal(before, after)
