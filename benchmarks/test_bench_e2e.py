"""End-to-end suite: SmolLM2 greedy generate per variant, at a small context (see tokaccel.bench.e2e)."""

import pytest

from tokaccel.bench.e2e import build_prompts, generate_once, make_variants

CONTEXT = 256
NEW_TOKENS = 8
VARIANTS = {v.name: v for v in make_variants(["dense"], ["prompt_lookup"], "cpu")}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate(benchmark, smollm2, variant):
    model, tokenizer = smollm2
    ids = build_prompts(CONTEXT, 1, tokenizer)
    benchmark.group = f"smollm2-ctx{CONTEXT}-new{NEW_TOKENS}"
    result = benchmark.pedantic(generate_once, args=(model, ids, NEW_TOKENS, VARIANTS[variant], tokenizer.pad_token_id,
                                                     "cpu"), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(ttft_ms=result.ttft_s * 1e3, tpot_ms=result.tpot_s * 1e3, kv_bytes=result.kv_bytes)
