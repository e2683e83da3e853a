"""tokaccel.vllm.paged on a synthetic paged cache (no vLLM needed): it reads the rows vLLM's CPU
layout holds, selects what the engine selects on the same keys, and its per-request states
never leak from one request to another that reuses the same blocks."""

import pytest
import torch

from tokaccel.policies.base import LayerContext, LayerInfo
from tokaccel.policies.engine import SelectionCall
from tokaccel.stats import Stats
from tokaccel.vllm import make_vllm_policy
from tokaccel.vllm.paged import PagedSelector, key_rows, split_kv_cache

H, HK, D, BS, NUM_BLOCKS = 6, 2, 16, 32, 40


def paged(keys: torch.Tensor, values: torch.Tensor, blocks: torch.Tensor, kv_cache: torch.Tensor | None = None):
    """Write keys / values [Hk, N, D] into a vLLM CPU cache [num_blocks, Hk, bs, 2D] (keys dim-major)
    at the blocks `blocks`; returns the cache."""
    if kv_cache is None:
        kv_cache = torch.zeros(NUM_BLOCKS, HK, BS, 2 * D)
    key_cache, value_cache = split_kv_cache(kv_cache)
    for t in range(keys.shape[1]):
        b, o = int(blocks[t // BS]), t % BS
        key_cache[b, :, :, o] = keys[:, t]
        value_cache[b, :, o] = values[:, t]
    return kv_cache


def dense(q, keys, values):
    G = H // HK
    scores = torch.einsum("hgd,hnd->hgn", q.view(HK, G, D), keys) * D ** -0.5
    return torch.einsum("hgn,hnd->hgd", scores.softmax(-1), values).reshape(H, D)


def sequence(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(HK, n, D, generator=g), torch.randn(HK, n, D, generator=g), torch.randn(H, D, generator=g)


def selector(spec: str) -> PagedSelector:
    return PagedSelector(make_vllm_policy(spec), 5, H, HK, D, D ** -0.5)


def test_split_views_see_the_rows_written():
    keys, values, _ = sequence(70, 0)
    blocks = torch.tensor([7, 3, 11])
    key_cache, value_cache = split_kv_cache(paged(keys, values, blocks))
    assert torch.equal(key_rows(key_cache, blocks, 70)[0], keys)
    assert torch.equal(value_cache[blocks].transpose(0, 1).reshape(HK, -1, D)[:, :70], values)


@pytest.mark.parametrize("spec", ["tokenselect:k=200,n_init=4,n_local=8,dense_fallback=false",
                                  "quest:k=208,page=16,n_init=4,n_local=8,dense_fallback=false,dense_layers=0"])
def test_a_covering_budget_is_dense_attention(spec):
    keys, values, q = sequence(150, 1)
    blocks = torch.randperm(NUM_BLOCKS)[:5]
    key_cache, value_cache = split_kv_cache(paged(keys, values, blocks))
    sel = selector(spec)
    assert sel.is_sparse(150)
    out = sel.decode(q, key_cache, value_cache, blocks, 150)
    torch.testing.assert_close(out, dense(q, keys, values), atol=1e-5, rtol=1e-5)
    assert sel.ctx.stats["keys_read"] == 150


@pytest.mark.parametrize("spec", ["tokenselect:k=16,n_init=4,n_local=8,theta=1.0",
                                  "quest:k=32,page=16,n_init=4,n_local=8,dense_layers=0"])
def test_a_small_budget_selects_what_the_engine_selects(spec):
    n = 300
    keys, values, q = sequence(n, 2)
    blocks = torch.randperm(NUM_BLOCKS)[:10]
    key_cache, value_cache = split_kv_cache(paged(keys, values, blocks))
    sel = selector(spec)
    out = sel.decode(q, key_cache, value_cache, blocks, n)

    policy = sel.policy
    info = LayerInfo(5, H, HK, D, None, "full_attention")
    ctx = LayerContext(info, policy, Stats(), state=policy.standalone_state(info, None))
    call = SelectionCall(policy, ctx, q[None, :, None], keys[None], values[None], None, D ** -0.5, compact=False)
    reference = call.decode(None)[0, 0]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert sel.ctx.stats["keys_read"] == ctx.stats["keys_read"] < n


def test_quest_pages_follow_the_growing_sequence():
    """Summaries updated token by token equal summaries built at once (what the engine builds)."""
    n = 100
    keys, values, q = sequence(n + 20, 3)
    blocks = torch.tensor([4, 9, 1, 30])
    kv_cache = paged(keys, values, blocks)
    key_cache, value_cache = split_kv_cache(kv_cache)
    grown = selector("quest:k=32,page=16,n_init=4,n_local=8,dense_layers=0")
    for length in range(n, n + 20):
        grown.decode(q, key_cache, value_cache, blocks, length + 1)
    fresh = selector("quest:k=32,page=16,n_init=4,n_local=8,dense_layers=0")
    fresh.decode(q, key_cache, value_cache, blocks, n + 20)
    (a,), (b,) = grown.requests[4], fresh.requests[4]
    assert torch.equal(a.block_index.kmax, b.block_index.kmax) and torch.equal(a.block_index.kmin, b.block_index.kmin)


def test_a_request_reusing_freed_blocks_starts_afresh():
    """theta=0 reuses a selection forever; a new request on the same blocks must not."""
    n = 200
    spec = "tokenselect:k=16,n_init=4,n_local=8,theta=0"
    blocks = torch.tensor([2, 5, 6, 8, 9, 10, 12])
    keys, values, q = sequence(n, 4)
    kv_cache = paged(keys, values, blocks)
    sel = selector(spec)
    sel.decode(q, *split_kv_cache(kv_cache), blocks, n)
    sel.decode(q, *split_kv_cache(kv_cache), blocks, n)  # the same request again: a hit
    assert (sel.ctx.stats["selection_hits"], sel.ctx.stats["selection_misses"]) == (1, 1)

    keys2, values2, q2 = sequence(n, 5)  # another request now owns the blocks
    paged(keys2, values2, blocks, kv_cache)
    out = sel.decode(q2, *split_kv_cache(kv_cache), blocks, n)
    assert sel.ctx.stats["selection_misses"] == 2
    alone = selector(spec).decode(q2, *split_kv_cache(kv_cache), blocks, n)
    assert torch.equal(out, alone)


def test_only_tokenselect_and_quest_in_original_positions():
    with pytest.raises(ValueError, match="supported"):
        make_vllm_policy("hisa:k=64")
    with pytest.raises(ValueError, match="original"):
        make_vllm_policy("tokenselect:position_mode=compact")
    assert make_vllm_policy("tokenselect:k=64").position_mode == "original"


def test_quest_on_whole_blocks_reads_a_superset_of_the_engines_pages():
    """Quest with page = block size: block_row lists whole blocks holding every token the engine's
    Quest reads (sinks, chosen pages, window), ends with the last block, and covers all at a
    covering budget."""
    n = 300
    keys, values, q = sequence(n, 6)
    blocks = torch.randperm(NUM_BLOCKS)[:10]
    key_cache, value_cache = split_kv_cache(paged(keys, values, blocks))
    spec = f"quest:k=64,page={BS},n_init=4,n_local=40,dense_layers=0"
    sel = selector(spec)
    assert sel.reads_blocks(BS)
    row, tokens = sel.block_row(q, key_cache, blocks, n)
    assert row[-1] == blocks[-1] and tokens == (row.shape[0] - 1) * BS + n - 9 * BS < n
    engine = selector(spec)
    engine.decode(q, key_cache, value_cache, blocks, n)
    (state,) = engine.requests[int(blocks[0])]
    read = set(state.selection.mid[state.selection.mid_valid].tolist()) | set(range(4)) | set(range(n - 40, n))
    logical = {int((blocks == b).nonzero()) for b in row}
    assert {t // BS for t in read} <= logical
    covering = selector(f"quest:k=512,page={BS},n_init=4,n_local=40,dense_layers=0,dense_fallback=false")
    assert torch.equal(covering.block_row(q, key_cache, blocks, n)[0], blocks)
