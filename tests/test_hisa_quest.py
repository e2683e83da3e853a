"""HISA and Quest: exactness vs dense, HISA = flat TokenSelect when the blocks fit, Quest's bound,
the incremental block index, errors, registry and patching."""

import functools

import pytest
import torch

import tokaccel
from tokaccel.blocks import BlockIndex
from tokaccel.cache import SelectionLayer
from tokaccel.kernels.ops import block_bound_scores, block_summaries
from tokaccel.policies import HISA, Quest, TokenSelect
from tokaccel.policies.base import LayerContext, LayerInfo
from tokaccel.policies.engine import SelectionCall
from tokaccel.stats import Stats

from testkit.models import tiny_model
from testkit.models import padded_batch as _batch
from testkit.models import run_generate as _run

SMALL = dict(n_init=4, n_local=8, chunk=16)
POLICIES = {
    "hisa-mean": lambda **kw: HISA(block=8, m=8, **kw),
    "hisa-bound": lambda **kw: HISA(block=8, m=8, block_score="bound", **kw),
    "quest": lambda **kw: Quest(page=4, dense_layers=0, **kw),
}


# ----------------------------------------------------------------------------- exactness


@functools.lru_cache(maxsize=None)
def _dense_reference(kind):
    model, batch = tiny_model(kind), _batch()
    return model, batch, _run(model, batch, steps=4)[:3]


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("mode,dense_fallback", [("compact", True), ("compact", False), ("original", False),
                                               ("auto", False)])
def test_exact_when_budget_covers_context(kind, name, mode, dense_fallback, monkeypatch):
    """k + n_init + n_local >= context: logits equal dense (fp32, 1e-4), prefill and decode, batch 2
    with left padding; dense_fallback=False runs the sparse path (block index, chunked prefill)."""
    model, batch, (ref_prefill, ref_steps, ref_tokens) = _dense_reference(kind)
    if mode == "auto":  # a trained length one token past the prompt: the cache switches at the second step
        monkeypatch.setattr(model.config, "max_position_embeddings", batch["input_ids"].shape[1] + 1)
    policy = POLICIES[name](k=40, position_mode=mode, dense_fallback=dense_fallback, auto_overrun=0, **SMALL)
    with tokaccel.patched(model, policy):
        prefill, steps, tokens, cache = _run(model, batch, steps=4)
        counters = tokaccel.stats(model)
    assert (counters.get("position_switches", 0) > 0) == (mode == "auto")
    real = batch["attention_mask"].bool()
    assert (prefill - ref_prefill)[real].abs().max() <= 1e-4
    assert (steps - ref_steps).abs().max() <= 1e-4
    assert torch.equal(tokens, ref_tokens)
    assert (counters.get("scored_blocks", 0) > 0) == (not dense_fallback)
    if not dense_fallback:
        indexed = [layer for layer in cache.layers if isinstance(layer, SelectionLayer)]
        assert indexed and all(layer.block_index.tokens == layer.get_seq_length() for layer in indexed)


def _selection(policy, q, key, key_valid, end, query_valid=None):
    """The (mid, valid) that `policy` adds to sinks and local window for scoring queries q."""
    B, Hk, N, D = key.shape
    info = LayerInfo(0, q.shape[1], Hk, D, None, "full_attention")
    call = SelectionCall(policy, LayerContext(info, policy, Stats()), q if q.dim() == 4 else q[:, :, None], key, key,
                         key_valid, D ** -0.5)
    return call.select(q, end, query_valid)


def _random_selection_inputs(B=2, H=6, Hk=2, N=150, D=16, pad=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(B, Hk, N, D, generator=g)
    key[:, :, 60:63] *= 4  # a few strong tokens
    q = torch.randn(B, H, D, generator=g)
    key_valid = torch.ones(B, N, dtype=torch.bool)
    key_valid[1, :pad] = False
    return q, key, key_valid


@pytest.mark.parametrize("block_score", ["mean", "bound"])
@pytest.mark.parametrize("block,m,tail", [(8, 19, 0), (16, 10, 0), (7, 30, 3), (64, 3, 0)])
def test_hisa_selects_what_flat_tokenselect_selects_when_blocks_fit(block_score, block, m, tail):
    """N <= m * block: every candidate block survives stage 1, so HISA's index set equals flat
    TokenSelect's (actual indices compared), for decode queries and tail queries with padding."""
    q, key, key_valid = _random_selection_inputs()
    N = key.shape[2]
    assert N <= m * block
    query_valid = None
    if tail:
        q = q[:, :, None].repeat(1, 1, tail, 1) + torch.randn(2, 6, tail, 16, generator=torch.Generator().manual_seed(5))
        query_valid = torch.tensor([[True] * tail, [False] + [True] * (tail - 1)])
    flat = _selection(TokenSelect(k=20, n_init=4, n_local=8), q, key, key_valid, N - 8, query_valid)
    hier = _selection(HISA(k=20, n_init=4, n_local=8, block=block, m=m, block_score=block_score),
                      q, key, key_valid, N - 8, query_valid)
    assert torch.equal(flat[1], hier[1])
    assert torch.equal(flat[0][flat[1]], hier[0][hier[1]])


@pytest.mark.parametrize("block_score", ["mean", "bound"])
def test_hisa_reads_only_the_kept_blocks_beyond_m_blocks(block_score):
    """N > m * block: the selection lies in at most m blocks, which include the blocks next to the
    sinks and the local window, and it differs from the flat selection."""
    q, key, key_valid = _random_selection_inputs(N=400)
    block, m = 16, 4
    policy = HISA(k=20, n_init=4, n_local=8, block=block, m=m, block_score=block_score)
    mid, valid = _selection(policy, q, key, key_valid, 392)
    flat, _ = _selection(TokenSelect(k=20, n_init=4, n_local=8), q, key, key_valid, 392)
    for b in range(2):
        blocks = set((mid[b][valid[b]] // block).tolist())
        first_candidate = int(key_valid[b].int().argmax()) + 4
        assert len(blocks) <= m and {first_candidate // block, 391 // block} <= blocks
    assert not torch.equal(mid, flat)


def test_hisa_equals_tokenselect_end_to_end_when_blocks_fit():
    """A real sparse selection (k=8 of a 96-token context), every block kept: HISA's logits are
    TokenSelect's, prefill and decode, with padding. Token ids are distinct: a repeated id gives
    layer 0 identical keys, whose tied votes top-k may break either way."""
    model, batch = tiny_model("llama"), _batch(length=96, pad=20)
    g = torch.Generator().manual_seed(1)
    batch["input_ids"] = torch.stack([torch.randperm(127, generator=g)[:96] + 1 for _ in range(2)])
    outs = []
    for policy in (TokenSelect(k=8, theta=0.5, **SMALL), HISA(k=8, theta=0.5, block=8, m=16, **SMALL)):
        with tokaccel.patched(model, policy):
            prefill, steps, tokens, _ = _run(model, batch, steps=4)
            outs.append((prefill, steps, tokens, tokaccel.stats(model)))
    (p0, s0, t0, c0), (p1, s1, t1, c1) = outs
    real = batch["attention_mask"].bool()
    assert (p0 - p1)[real].abs().max() <= 1e-5 and (s0 - s1).abs().max() <= 1e-5 and torch.equal(t0, t1)
    assert c0["keys_read"] == c1["keys_read"] and c1["scored_blocks"] > 0


def test_quest_reads_whole_pages_within_the_budget():
    q, key, key_valid = _random_selection_inputs(N=400)
    page, k = 16, 40
    mid, valid = _selection(Quest(k=k, n_init=4, n_local=8, page=page), q, key, key_valid, 392)
    for b in range(2):
        rows = mid[b][valid[b]]
        first_candidate = int(key_valid[b].int().argmax()) + 4
        assert rows.numel() <= k and rows.min() >= first_candidate and rows.max() < 392
        for p in set((rows // page).tolist()):  # every candidate of a chosen page is read
            whole = torch.arange(max(p * page, first_candidate), min((p + 1) * page, 392))
            assert torch.isin(whole, rows).all()


# ----------------------------------------------------------------------------- block index and bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quest_bound_is_an_upper_bound_of_every_score_in_the_page(dtype):
    g = torch.Generator().manual_seed(3)
    B, Hk, G, N, D, page = 2, 3, 3, 77, 32, 16
    keys = (torch.randn(B, Hk, N, D, generator=g) * torch.rand(1, 1, N, 1, generator=g) * 5).to(dtype)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[0, :21] = False
    q = torch.randn(B, Hk * G, D, generator=g) * 3
    _, kmax, kmin, count = block_summaries(keys, valid, page)
    bound = block_bound_scores(q, kmax, kmin, 0.7)  # [B, H, nb]
    scores = 0.7 * torch.einsum("bhgd,bhnd->bhgn", q.view(B, Hk, G, D), keys.float()).reshape(B, Hk * G, N)
    per_token_bound = bound.repeat_interleave(page, dim=2)[:, :, :N]
    slack = (per_token_bound - scores)[valid[:, None].expand_as(scores)]
    assert slack.min() >= -1e-4
    # tight for a one-token page: the bound is the score itself
    _, kmax1, kmin1, _ = block_summaries(keys, None, 1)
    torch.testing.assert_close(block_bound_scores(q, kmax1, kmin1, 0.7), scores, rtol=1e-5, atol=1e-4)


def test_block_index_is_incremental_and_matches_a_fresh_summary(monkeypatch):
    """Appending prefill chunks and single tokens re-summarises only the last block and the new
    ones, and ends equal to summarising everything at once."""
    import tokaccel.kernels.block_index as ops

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 70, 8, generator=g)
    valid = torch.ones(2, 70, dtype=torch.bool)
    valid[1, :13] = False
    firsts = []
    spy = ops.block_summaries

    def recording(keys, valid, block, first_block=0, **kw):
        firsts.append(first_block)
        return spy(keys, valid, block, first_block, **kw)

    monkeypatch.setattr(ops, "block_summaries", recording)
    index = BlockIndex(16, with_mean=True, with_bounds=True)
    for n in (40, 41, 47, 48, 49, 70, 70):
        index.update(keys[:, :, :n], valid[:, :n])
    assert firsts == [0, 2, 2, 2, 3, 3]  # no call for an unchanged length
    mean, kmax, kmin, count = spy(keys, valid, 16)
    torch.testing.assert_close(index.mean, mean)
    assert torch.equal(index.kmax, kmax) and torch.equal(index.kmin, kmin) and torch.equal(index.count, count)
    assert count[1].tolist() == [3, 16, 16, 16, 6]
    index.update(keys[:, :, :30], valid[:, :30])  # shorter than summarised: rebuilt from scratch
    assert firsts[-1] == 0 and index.num_blocks == 2


def test_block_index_lives_on_the_cache_layer_and_edits_drop_it():
    model, batch = tiny_model("llama"), _batch(length=60, pad=0)
    with tokaccel.patched(model, HISA(k=8, block=8, m=4, **SMALL)):
        _, _, _, cache = _run(model, batch, steps=3, forward=False)
    layer = cache.layers[0]
    assert isinstance(layer.block_index, BlockIndex)
    assert layer.block_index.nbytes() < layer.keys.numel() * layer.keys.element_size() / 4  # summaries, not K
    layer.crop(-5)
    assert layer.block_index is None and layer.selection is None


# ----------------------------------------------------------------------------- config, registry, patching


@pytest.mark.parametrize("cls,config,match", [
    (HISA, {"k": 0}, r"hisa: k=0 .*integer >= 1"),
    (HISA, {"block": 0}, r"hisa: block=0 .*integer >= 1"),
    (HISA, {"m": 0}, r"hisa: m=0 .*integer >= 1"),
    (HISA, {"block_score": "max"}, r"block_score='max' .*mean.*bound"),
    (HISA, {"k": 100, "block": 8, "m": 4}, r"m \* block = 32 is smaller than k=100"),
    (HISA, {"pool": 3}, r"hisa: pool=3"),
    (Quest, {"k": -1}, r"quest: k=-1 .*integer >= 1"),
    (Quest, {"page": 0}, r"quest: page=0 .*integer >= 1"),
    (Quest, {"dense_layers": -1}, r"dense_layers=-1"),
    (Quest, {"head_vote": "mean"}, r"head_vote='mean' .*max.*soft"),
    (Quest, {"theta": 2}, r"quest: theta=2"),
])
def test_bad_config_is_refused(cls, config, match):
    with pytest.raises(ValueError, match=match):
        cls(**config)
    with pytest.raises(ValueError, match=match):
        tokaccel.patch_model(tiny_model("llama"), cls.name, **config)


def test_registry_defaults_patch_and_unpatch():
    assert {"hisa", "quest"} <= set(tokaccel.policies())
    hisa = tokaccel.make_policy("hisa:k=64,block=32,m=4,block_score=bound")
    assert isinstance(hisa, HISA) and (hisa.k, hisa.block, hisa.m, hisa.block_score) == (64, 32, 4, "bound")
    assert (HISA().block, HISA().m, HISA().block_score, HISA().theta) == (128, 64, "mean", 0.9)
    quest = Quest()
    assert (quest.page, quest.dense_layers, quest.theta, quest.position_mode) == (16, 2, 1.0, "original")
    assert quest.budget == TokenSelect().budget  # k means the same tokens for every selection policy

    model, batch = tiny_model("gemma3"), _batch(length=48, pad=0)
    with torch.no_grad():
        before = model(**batch).logits
        for policy in ("hisa:k=8,block=8,m=2,n_init=4,n_local=8,chunk=16", "quest:k=8,page=4,n_init=4,n_local=8"):
            tokaccel.patch_model(model, policy)
            model(**batch)
            counters = tokaccel.stats(model)
            tokaccel.unpatch_model(model)
            assert counters["sparse_calls"] > 0, policy
        after = model(**batch).logits
    assert torch.equal(before, after)
    # Quest keeps its first `dense_layers` layers dense: of gemma3-tiny's global layers (2 and 5),
    # dense_layers=3 leaves only layer 5 sparse
    tokaccel.patch_model(model, Quest(k=8, n_init=4, n_local=8, dense_layers=3))
    with torch.no_grad():
        model(**batch)
    assert tokaccel.stats(model)["sparse_calls"] == 1  # only layer 5
    tokaccel.unpatch_model(model)


def test_selection_iou_with_the_flat_selection():
    """IoU 1 while every block fits in m, below 1 once stage 1 has to drop blocks."""
    from tokaccel.policies.hisa import selection_iou

    q, key, key_valid = _random_selection_inputs(N=400)
    flat = TokenSelect(k=20, n_init=4, n_local=8)
    fits = selection_iou(HISA(k=20, n_init=4, n_local=8, block=16, m=25), flat, q, key, key_valid)
    assert torch.equal(fits, torch.ones(2))
    dropped = selection_iou(HISA(k=20, n_init=4, n_local=8, block=16, m=4), flat, q, key, key_valid)
    assert (dropped < 1).all() and (dropped > 0).all()
