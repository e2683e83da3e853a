"""End-to-end harness in smoke sizes: variants, prompts, KV bytes, rows. No timed assertions."""

import pytest
import torch

from tokaccel.bench.e2e import (TINY_MODEL, build_prompts, cache_bytes, load_model, make_variants, run_e2e,
                                smoke_config)

ROW_COLUMNS = {"model", "context", "batch", "new_tokens", "variant", "kind", "status", "reason", "ttft_ms", "tpot_ms",
               "tokens_per_s", "decode_tokens_per_s", "peak_mem_mb", "kv_bytes", "agree_with_hf", "speedup_ttft",
               "speedup_tpot", "repeats", "threads"}


def test_variants():
    variants = make_variants(["dense"], ["prompt_lookup:n=5", "quantized:nbits=2", "offloaded"], "cpu")
    assert [v.name for v in variants] == ["hf", "dense", "prompt_lookup:n=5", "quantized:nbits=2", "offloaded"]
    assert variants[2].generate_kwargs == {"prompt_lookup_num_tokens": 5}
    assert variants[3].generate_kwargs["cache_config"] == {"backend": "quanto", "nbits": 2}
    assert "CUDA" in variants[4].skip_reason
    with pytest.raises(ValueError, match="unknown peer"):
        make_variants([], ["nope"], "cpu")


def test_random_prompts_have_exactly_n_tokens():
    ids = build_prompts(100, 3, vocab_size=50, mode="random")
    assert ids.shape == (3, 100) and int(ids.max()) < 50


def test_tiny_model_rows_and_skips():
    model, tok = load_model(TINY_MODEL, "cpu", torch.float32)
    rows = run_e2e(smoke_config(model=TINY_MODEL, peers=["prompt_lookup", "offloaded"]), {"run_id": "x"},
                   model_and_tokenizer=(model, tok))
    by = {(r["batch"], r["variant"]): r for r in rows}
    assert set(by) == {(b, v) for b in (1, 2) for v in ("hf", "dense", "prompt_lookup", "offloaded")}
    for key in [(1, "hf"), (1, "dense"), (1, "prompt_lookup"), (2, "hf"), (2, "dense")]:
        row = by[key]
        assert row["status"] == "ok" and ROW_COLUMNS <= set(row) and row["run_id"] == "x"
        assert row["repeats"] == 1 and row["kv_bytes"] > 0 and row["ttft_ms"] > 0
    assert by[(1, "dense")]["agree_with_hf"] == 1.0  # dense is exact
    assert by[(1, "hf")]["tokens_per_step"] == 1.0 and by[(1, "prompt_lookup")]["tokens_per_step"] >= 1.0
    assert by[(2, "prompt_lookup")]["status"] == "skipped" and "batch" in by[(2, "prompt_lookup")]["reason"]
    assert by[(1, "offloaded")]["status"] == "skipped"


def test_smollm2_kv_bytes_and_exactness(smollm2):
    """KV bytes after generate = layers x K,V x B x Hk x (N + M - 1) x D x 4 bytes (the last token is not cached)."""
    config = smoke_config(model="smollm2", contexts=(40,), batch_sizes=(2,), new_tokens=3, peers=[])
    rows = run_e2e(config, model_and_tokenizer=smollm2)
    model = smollm2[0]
    c = model.config
    expected = c.num_hidden_layers * 2 * 2 * c.num_key_value_heads * (40 + 3 - 1) * (c.hidden_size // c.num_attention_heads) * 4
    assert [r["kv_bytes"] for r in rows] == [expected, expected]
    assert rows[1]["variant"] == "dense" and rows[1]["agree_with_hf"] == 1.0 and rows[0]["prompt"] == "text"
    ids = build_prompts(40, 2, smollm2[1])
    assert ids.shape == (2, 40) and not torch.equal(ids[0], ids[1])


def test_cache_bytes_of_a_dynamic_cache():
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), 0)
    assert cache_bytes(cache) == 2 * 2 * 5 * 8 * 4 and cache_bytes(None) == 0


def test_cache_bytes_counts_a_shared_buffer_once():
    """TokenSelect's SelectionLayer keeps `keys` as a view of a buffer it also holds: one copy."""
    import tokaccel
    from tokaccel.cache import GROW
    from transformers import DynamicCache

    from testkit.models import tiny_model

    model = tiny_model()
    ids = torch.randint(1, 128, (1, 40))
    dense_cache, ts_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=dense_cache)
        with tokaccel.patched(model, "tokenselect", k=8, n_init=2, n_local=4, chunk=16):
            model(ids, past_key_values=ts_cache)
    dense, selected = cache_bytes(dense_cache), cache_bytes(ts_cache)
    per_token = dense // 40
    assert dense <= selected <= dense + GROW * per_token
