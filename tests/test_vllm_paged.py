"""tokaccel.vllm.paged on a synthetic paged cache (no vLLM needed): it reads the rows vLLM's CPU
layout holds, selects what the engine selects on the same keys, and its per-request states
never leak from one request to another that reuses the same blocks."""

import pytest
import torch

from tokaccel.policies.base import LayerContext, LayerInfo
from tokaccel.policies.engine import SelectionCall
from tokaccel.stats import Stats
from tokaccel.vllm import make_vllm_policy
from tokaccel.vllm.paged import NHDLayout, PagedSelector, VecLayout, key_rows, split_kv_cache, split_nhd

H, HK, D, BS, NUM_BLOCKS = 6, 2, 16, 32, 40
LAYOUTS = {"cpu": (VecLayout, split_kv_cache), "nhd": (NHDLayout, split_nhd)}
layouts = pytest.mark.parametrize("layout", list(LAYOUTS))


def split(kv_cache: torch.Tensor, layout: str = "cpu"):
    """(key_cache, value_cache) views of one layer's cache [num_blocks, Hk, bs, 2D] as vLLM's CPU
    ("cpu") or CUDA ("nhd") backend splits it."""
    return LAYOUTS[layout][1](kv_cache)


def paged(keys: torch.Tensor, values: torch.Tensor, blocks: torch.Tensor, kv_cache: torch.Tensor | None = None,
          layout: str = "cpu"):
    """Write keys / values [Hk, N, D] into a vLLM cache [num_blocks, Hk, bs, 2D] at the blocks
    `blocks`, in vLLM's CPU layout (keys dim-major) or its CUDA one; returns the cache."""
    if kv_cache is None:
        kv_cache = torch.zeros(NUM_BLOCKS, HK, BS, 2 * D)
    key_cache, value_cache = split(kv_cache, layout)
    for t in range(keys.shape[1]):
        b, o = int(blocks[t // BS]), t % BS
        if layout == "cpu":
            key_cache[b, :, :, o] = keys[:, t]
            value_cache[b, :, o] = values[:, t]
        else:
            key_cache[b, o] = keys[:, t]
            value_cache[b, o] = values[:, t]
    return kv_cache


def dense(q, keys, values):
    G = H // HK
    scores = torch.einsum("hgd,hnd->hgn", q.view(HK, G, D), keys) * D ** -0.5
    return torch.einsum("hgn,hnd->hgd", scores.softmax(-1), values).reshape(H, D)


def sequence(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(HK, n, D, generator=g), torch.randn(HK, n, D, generator=g), torch.randn(H, D, generator=g)


def selector(spec: str, layout: str = "cpu") -> PagedSelector:
    return PagedSelector(make_vllm_policy(spec), 5, H, HK, D, D ** -0.5, layout=LAYOUTS[layout][0])


def test_split_views_see_the_rows_written():
    keys, values, _ = sequence(70, 0)
    blocks = torch.tensor([7, 3, 11])
    key_cache, value_cache = split_kv_cache(paged(keys, values, blocks))
    assert torch.equal(key_rows(key_cache, blocks, 70)[0], keys)
    assert torch.equal(value_cache[blocks].transpose(0, 1).reshape(HK, -1, D)[:, :70], values)


@layouts
def test_both_layouts_read_the_same_rows(layout):
    keys, values, _ = sequence(70, 0)
    blocks = torch.tensor([7, 3, 11])
    kind = LAYOUTS[layout][0]
    key_cache, value_cache = split(paged(keys, values, blocks, layout=layout), layout)
    assert kind.block_size(key_cache) == BS and kind.heads_dim(key_cache) == (HK, D)
    assert torch.equal(kind.key_rows(key_cache, blocks, 70)[0], keys)
    idx = torch.tensor([69, 0, 33, 40])
    k, v = kind.rows_at(key_cache, value_cache, blocks, idx)
    assert torch.equal(k[0], keys[:, idx]) and torch.equal(v[0], values[:, idx])
    assert torch.equal(kind.key_rows_at(key_cache, blocks, idx)[0], keys[:, idx])
    whole = kind.block_keys(key_cache, blocks[:2])  # [2, Hk, bs, D]
    assert torch.equal(whole.transpose(0, 1).reshape(HK, 2 * BS, D), keys[:, :2 * BS])


@layouts
@pytest.mark.parametrize("spec", ["tokenselect:k=200,n_init=4,n_local=8,dense_fallback=false",
                                  "quest:k=208,page=16,n_init=4,n_local=8,dense_fallback=false,dense_layers=0",
                                  "quest:k=224,page=32,n_init=4,n_local=8,dense_fallback=false,dense_layers=0"])
def test_a_covering_budget_is_dense_attention(spec, layout):
    keys, values, q = sequence(150, 1)
    blocks = torch.randperm(NUM_BLOCKS)[:5]
    key_cache, value_cache = split(paged(keys, values, blocks, layout=layout), layout)
    sel = selector(spec, layout)
    assert sel.is_sparse(150)
    out = sel.decode(q, key_cache, value_cache, blocks, 150)
    torch.testing.assert_close(out, dense(q, keys, values), atol=1e-5, rtol=1e-5)
    assert sel.ctx.stats["keys_read"] == 150


@layouts
@pytest.mark.parametrize("spec", ["tokenselect:k=16,n_init=4,n_local=8,theta=1.0",
                                  "quest:k=32,page=16,n_init=4,n_local=8,dense_layers=0",
                                  "quest:k=64,page=32,n_init=4,n_local=8,dense_layers=0"])
def test_a_small_budget_selects_what_the_engine_selects(spec, layout):
    n = 300
    keys, values, q = sequence(n, 2)
    blocks = torch.randperm(NUM_BLOCKS)[:10]
    key_cache, value_cache = split(paged(keys, values, blocks, layout=layout), layout)
    sel = selector(spec, layout)
    out = sel.decode(q, key_cache, value_cache, blocks, n)

    policy = sel.policy
    info = LayerInfo(5, H, HK, D, None, "full_attention")
    ctx = LayerContext(info, policy, Stats(), state=policy.standalone_state(info, None))
    call = SelectionCall(policy, ctx, q[None, :, None], keys[None], values[None], None, D ** -0.5, compact=False)
    reference = call.decode(None)[0, 0]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert sel.ctx.stats["keys_read"] == ctx.stats["keys_read"] < n


@layouts
@pytest.mark.parametrize("page", [16, BS])
def test_quest_pages_follow_the_growing_sequence(layout, page):
    """Summaries updated token by token equal summaries built at once (what the engine builds)."""
    n = 100
    keys, values, q = sequence(n + 20, 3)
    blocks = torch.tensor([4, 9, 1, 30])
    kv_cache = paged(keys, values, blocks, layout=layout)
    key_cache, value_cache = split(kv_cache, layout)
    spec = f"quest:k=32,page={page},n_init=4,n_local=8,dense_layers=0"
    grown = selector(spec, layout)
    for length in range(n, n + 20):
        grown.decode(q, key_cache, value_cache, blocks, length + 1)
    fresh = selector(spec, layout)
    fresh.decode(q, key_cache, value_cache, blocks, n + 20)
    (a,), (b,) = grown.requests[4], fresh.requests[4]
    assert torch.equal(a.block_index.kmax, b.block_index.kmax) and torch.equal(a.block_index.kmin, b.block_index.kmin)


@layouts
def test_a_request_reusing_freed_blocks_starts_afresh(layout):
    """theta=0 reuses a selection forever; a new request on the same blocks must not."""
    n = 200
    spec = "tokenselect:k=16,n_init=4,n_local=8,theta=0"
    blocks = torch.tensor([2, 5, 6, 8, 9, 10, 12])
    keys, values, q = sequence(n, 4)
    kv_cache = paged(keys, values, blocks, layout=layout)
    sel = selector(spec, layout)
    sel.decode(q, *split(kv_cache, layout), blocks, n)
    sel.decode(q, *split(kv_cache, layout), blocks, n)  # the same request again: a hit
    assert (sel.ctx.stats["selection_hits"], sel.ctx.stats["selection_misses"]) == (1, 1)

    keys2, values2, q2 = sequence(n, 5)  # another request now owns the blocks
    paged(keys2, values2, blocks, kv_cache, layout=layout)
    out = sel.decode(q2, *split(kv_cache, layout), blocks, n)
    assert sel.ctx.stats["selection_misses"] == 2
    alone = selector(spec, layout).decode(q2, *split(kv_cache, layout), blocks, n)
    assert torch.equal(out, alone)


@layouts
def test_a_preempted_request_recomputed_with_other_tokens_starts_afresh(layout):
    """Preemption frees a request's blocks; recomputed (here: a different continuation written
    into the same blocks, shorter than before), its old selection must not be reused."""
    n = 200
    spec = "tokenselect:k=16,n_init=4,n_local=8,theta=0"
    blocks = torch.tensor([3, 1, 4, 15, 9, 26, 5])
    keys, values, q = sequence(n, 7)
    kv_cache = paged(keys, values, blocks, layout=layout)
    sel = selector(spec, layout)
    sel.decode(q, *split(kv_cache, layout), blocks, n)
    keys2, values2, _ = sequence(n, 8)
    keys2[:, :150], values2[:, :150] = keys[:, :150], values[:, :150]  # same prompt, other continuation
    paged(keys2, values2, blocks, kv_cache, layout=layout)
    out = sel.decode(q, *split(kv_cache, layout), blocks, 180)
    assert sel.ctx.stats["selection_misses"] == 2
    assert torch.equal(out, selector(spec, layout).decode(q, *split(kv_cache, layout), blocks, 180))


def test_only_tokenselect_and_quest_in_original_positions():
    with pytest.raises(ValueError, match="supported"):
        make_vllm_policy("hisa:k=64")
    with pytest.raises(ValueError, match="original"):
        make_vllm_policy("tokenselect:position_mode=compact")
    assert make_vllm_policy("tokenselect:k=64").position_mode == "original"


@layouts
def test_quest_on_whole_blocks_reads_a_superset_of_the_engines_pages(layout):
    """Quest with page = block size: block_row lists whole blocks holding every token the engine's
    Quest reads (sinks, chosen pages, window), ends with the last block, and covers all at a
    covering budget."""
    n = 300
    keys, values, q = sequence(n, 6)
    blocks = torch.randperm(NUM_BLOCKS)[:10]
    key_cache, value_cache = split(paged(keys, values, blocks, layout=layout), layout)
    spec = f"quest:k=64,page={BS},n_init=4,n_local=40,dense_layers=0"
    sel = selector(spec, layout)
    assert sel.reads_blocks(BS)
    row, tokens = sel.block_row(q, key_cache, blocks, n)
    assert row[-1] == blocks[-1] and tokens == (row.shape[0] - 1) * BS + n - 9 * BS < n
    engine = selector(spec, layout)
    engine.decode(q, key_cache, value_cache, blocks, n)
    (state,) = engine.requests[int(blocks[0])]
    read = set(state.selection.mid[state.selection.mid_valid].tolist()) | set(range(4)) | set(range(n - 40, n))
    logical = {int((blocks == b).nonzero()) for b in row}
    assert {t // BS for t in read} <= logical
    covering = selector(f"quest:k=512,page={BS},n_init=4,n_local=40,dense_layers=0,dense_fallback=false", layout)
    assert torch.equal(covering.block_row(q, key_cache, blocks, n)[0], blocks)


@pytest.mark.parametrize("n,k,n_init", [(300, 64, 4), (300, 100, 40), (1000, 300, 64), (300, 20, 4),
                                         (60, 64, 4), (300, 600, 4)])
def test_whole_block_pages_are_quests_page_choice(n, k, n_init):
    """block_row's shortcut (forced end blocks, then the top full blocks) picks the pages
    Quest.page_choice picks on the same bounds (budgets below the forced pages go through
    page_choice itself)."""
    num_blocks = -(-(n + 1) // BS)
    keys, values, _ = sequence(n, 8)
    kv_cache = torch.zeros(max(NUM_BLOCKS, num_blocks), HK, BS, 2 * D)
    blocks = torch.randperm(kv_cache.shape[0])[:num_blocks]
    key_cache, _ = split_kv_cache(paged(keys, values, blocks, kv_cache))
    sel = selector(f"quest:k={k},page={BS},n_init={n_init},n_local=40,dense_layers=0")
    state = sel.state_for(key_cache, blocks, n)
    bounds = sel._update_bounds(state, key_cache, blocks, n)
    end = n - 40
    first, last = n_init // BS, (end - 1) // BS
    for seed in range(5):
        q = torch.randn(H, D, generator=torch.Generator().manual_seed(seed))
        fast = sel._choose_pages(q, bounds, end)
        general = sel._page_choice(q, bounds, n_init, end, first, last)
        assert sorted(fast.tolist()) == sorted(general.tolist())
        assert len(set(fast.tolist())) == len(fast)


@pytest.mark.parametrize("start", [0, 5, 64])
def test_whole_block_bounds_follow_the_growing_sequence(start):
    """block_row's page bounds updated step by step (from `start` tokens) equal bounds built at once."""
    keys, values, q = sequence(140, 9)
    blocks = torch.tensor([4, 9, 1, 30, 12])
    key_cache, _ = split_kv_cache(paged(keys, values, blocks))
    spec = f"quest:k=32,page={BS},n_init=4,n_local=8,dense_layers=0"
    grown, fresh = selector(spec), selector(spec)
    if start:
        grown.block_row(q, key_cache, blocks, start)
    for length in range(max(start, 100), 141):
        grown.block_row(q, key_cache, blocks, length)
    fresh.block_row(q, key_cache, blocks, 140)
    (a,), (b,) = grown.requests[4], fresh.requests[4]
    nb = -(-140 // BS)
    assert torch.equal(a.page_bounds.bounds[:, :, :nb], b.page_bounds.bounds[:, :, :nb])
    full = keys[:, :128].reshape(HK, 4, BS, D)
    assert torch.equal(b.page_bounds.bounds[:, :D, :4], full.amax(2).transpose(1, 2))
    assert torch.equal(b.page_bounds.bounds[:, D:, 4], keys[:, 128:].amin(1))


def test_the_cuda_path_batched_kernel_equals_per_request_decode():
    """What TokaccelCUDAImpl does for a batch (indices per request, then one
    paged_indexed_attention call over the block tables) equals decode() of each request alone."""
    from tokaccel.kernels.paged_attention import paged_indexed_attention

    lengths, spec = (300, 170), "tokenselect:k=16,n_init=4,n_local=8"
    kv_cache = torch.zeros(NUM_BLOCKS, HK, BS, 2 * D)
    tables, queries = torch.randperm(NUM_BLOCKS)[:20].view(2, 10), []
    for b, n in enumerate(lengths):
        keys, values, q = sequence(n, 10 + b)
        paged(keys, values, tables[b], kv_cache, layout="nhd")
        queries.append(q)
    key_cache, value_cache = split(kv_cache, "nhd")
    batched, alone = selector(spec, "nhd"), selector(spec, "nhd")
    picked = [batched.indices(queries[b], key_cache, tables[b], n) for b, n in enumerate(lengths)]
    idx = torch.nn.utils.rnn.pad_sequence([i for i, _ in picked], batch_first=True)
    valid = torch.nn.utils.rnn.pad_sequence([v for _, v in picked], batch_first=True)
    out = paged_indexed_attention(torch.stack(queries), key_cache, value_cache, tables.int(), idx, valid, D ** -0.5)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b], alone.decode(queries[b], key_cache, value_cache, tables[b], n),
                                   atol=1e-5, rtol=1e-5)
