"""TokenSelect: exactness vs dense, selection, the soft vote, the selection cache, one copy of K, errors."""

import pytest
import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import tokaccel
from tokaccel.cache import GROW, SelectionLayer
from tokaccel.policies import TokenSelect
from tokaccel.rope import RopeTable, find_rotary_embedding, rotate, unrotate
from tokaccel.selection import SelectionState, assemble, cache_hits, merge_rows, soft_vote, top_k

from .conftest import tiny_model

KINDS = ["llama", "qwen2", "mistral", "gemma3"]


def _tiny(kind):
    # Mistral's tiny config slides over 8 tokens everywhere; full attention is what TokenSelect runs on.
    return tiny_model(kind, sliding_window=None) if kind == "mistral" else tiny_model(kind)


def _batch(length=40, pad=9, seed=1):
    input_ids = torch.randint(1, 128, (2, length), generator=torch.Generator().manual_seed(seed))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :pad] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def _run(model, batch, steps=6):
    """Prefill logits, per-step decode logits [steps, B, V], generated tokens, and the cache."""
    out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return model(**batch).logits, torch.stack(out.logits), out.sequences, out.past_key_values


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["compact", "original"])
@pytest.mark.parametrize("dense_fallback", [True, False])
def test_exact_when_budget_covers_context(kind, mode, dense_fallback):
    """k + n_init + n_local >= context: logits equal dense (fp32, 1e-4), prefill and decode, batch 2
    with left padding. dense_fallback=False runs the sparse path (chunked prefill of 16-token
    chunks, gathered rows, compact re-rotation, padding masks) with a selection that keeps all."""
    model, batch = _tiny(kind), _batch()
    ref_prefill, ref_steps, ref_tokens, _ = _run(model, batch)
    policy = TokenSelect(k=40, n_init=4, n_local=8, chunk=16, position_mode=mode, dense_fallback=dense_fallback)
    with tokaccel.patched(model, policy):
        prefill, steps, tokens, _ = _run(model, batch)
        counters = tokaccel.stats(model)
    real = batch["attention_mask"].bool()  # padded positions carry no meaning in either run
    assert (prefill - ref_prefill)[real].abs().max() <= 1e-4
    assert (steps - ref_steps).abs().max() <= 1e-4
    assert torch.equal(tokens, ref_tokens)
    assert (counters.get("sparse_calls", 0) > 0) == (not dense_fallback)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_exact_on_real_models(name, request):
    """The real SmolLM2 (GQA 3) and Gemma3 (MQA, D=256, hybrid): sparse path with a covering
    budget equals dense, in both position modes (sliding Gemma3 layers stay dense)."""
    model, tokenizer = request.getfixturevalue(name)
    tokenizer.padding_side = "left"
    batch = tokenizer(["The quick brown fox jumps over the lazy dog because it wanted to see the", "Paris is"],
                      return_tensors="pt", padding=True)
    ref_prefill, ref_steps, ref_tokens, _ = _run(model, batch, steps=4)
    real = batch["attention_mask"].bool()
    for mode in ("compact", "original"):
        with tokaccel.patched(model, "tokenselect", k=64, n_init=2, n_local=4, chunk=8, position_mode=mode,
                              dense_fallback=False):
            prefill, steps, tokens, _ = _run(model, batch, steps=4)
        assert (prefill - ref_prefill)[real].abs().max() <= 1e-4, mode
        assert (steps - ref_steps).abs().max() <= 1e-4, mode
        assert torch.equal(tokens, ref_tokens), mode


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize("mode", ["compact", "original"])
def test_selection_reads_fewer_tokens_than_the_context(mode):
    model, batch = _tiny("llama"), _batch(length=96, pad=20)
    policy = TokenSelect(k=8, n_init=4, n_local=8, chunk=32, theta=0.5, position_mode=mode)
    with torch.no_grad(), tokaccel.patched(model, policy):
        prefill, steps, tokens, cache = _run(model, batch, steps=4)
        counters = tokaccel.stats(model)
        assert all(isinstance(layer, SelectionLayer) for layer in cache.layers)
        # one more decode step after a fresh selection: every layer reads the budget, not the context
        for layer in cache.layers:
            layer.selection = None
        tokaccel.reset_stats(model)
        mask = torch.cat((batch["attention_mask"], torch.ones(2, 4, dtype=torch.long)), dim=1)
        model(input_ids=tokens[:, -1:], attention_mask=mask, past_key_values=cache)
        step = tokaccel.stats(model)
    assert torch.isfinite(prefill).all() and torch.isfinite(steps).all()
    assert counters["sparse_calls"] > 0 and counters["scored_keys"] > 0
    assert counters["keys_read_per_call"] < 96
    assert counters["selection_hits"] + counters["selection_misses"] == 2 * 2 * 3  # rows x layers x decode steps
    assert step["keys_read"] == 2 * 2 * policy.budget  # layers x rows x (4 sinks + 8 selected + 8 local)
    assert step["selection_misses"] == 4 and step["scored_keys"] == 2 * 2 * (100 - 4 - 8)


def _naive_vote(q, k, scale, kv_head):
    """Per-head loop: v[b, t] = sum_h softmax_t(scale * q[b, h] . k[b, kv_head(h), t])."""
    B, H, _ = q.shape
    vote = torch.zeros(B, k.shape[2], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            logits = (k[b, kv_head(h)].double() @ q[b, h].double()) * scale
            vote[b] += torch.softmax(logits, dim=0)
    return vote


@pytest.mark.parametrize("H,Hk", [(9, 3), (8, 2), (4, 1), (4, 4)])
def test_soft_vote_matches_a_per_head_loop(H, Hk):
    gen = torch.Generator().manual_seed(H * 10 + Hk)
    B, N, D = 2, 37, 16
    q, k = torch.randn(B, H, D, generator=gen), torch.randn(B, Hk, N, D, generator=gen)
    G = H // Hk
    group = soft_vote(q, k, 0.25)
    release = soft_vote(q, k, 0.25, head_mapping="release_mod")
    torch.testing.assert_close(group.double(), _naive_vote(q, k, 0.25, lambda h: h // G), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(release.double(), _naive_vote(q, k, 0.25, lambda h: h % Hk), rtol=1e-5, atol=1e-6)
    if 1 < Hk < H:  # the release's mapping really differs under GQA
        assert (group - release).abs().max() > 1e-3
    else:  # MQA or MHA: both mappings agree
        torch.testing.assert_close(group, release)
    # masked candidates get -inf and do not take softmax mass; w queries per head each vote
    valid = torch.rand(B, N, generator=gen) > 0.3
    masked = soft_vote(q, k, 0.25, valid)
    assert torch.isneginf(masked[~valid]).all()
    for b in range(B):
        expect = _naive_vote(q[b:b + 1], k[b:b + 1, :, valid[b]], 0.25, lambda h: h // G)[0]
        torch.testing.assert_close(masked[b, valid[b]].double(), expect, rtol=1e-5, atol=1e-6)
    qw = torch.randn(B, H, 3, D, generator=gen)
    multi = soft_vote(qw, k, 0.25)
    torch.testing.assert_close(multi, sum(soft_vote(qw[:, :, i], k, 0.25) for i in range(3)), rtol=1e-5, atol=1e-5)
    only_last = soft_vote(qw, k, 0.25, query_valid=torch.tensor([[False, False, True]] * B))
    torch.testing.assert_close(only_last, soft_vote(qw[:, :, 2], k, 0.25), rtol=1e-5, atol=1e-6)


def test_top_k_pooling_and_masking():
    vote = torch.tensor([[0.0, 5.0, float("-inf"), 1.0, 4.0, 0.5, 3.0]])
    idx, valid = top_k(vote, 3)
    assert idx.tolist() == [[1, 4, 6]] and valid.all()
    idx, valid = top_k(vote, 10)  # more than the candidates: the -inf one is returned invalid
    assert idx.shape == (1, 7) and idx[valid].tolist() == [0, 1, 3, 4, 5, 6]
    idx, _ = top_k(vote, 2, pool=3)  # pooled: 0 inherits 5.0 from its neighbour 1 and beats 4
    assert idx.tolist() == [[0, 1]]
    idx, valid = top_k(vote, 7, pool=3)  # a masked candidate stays masked after pooling
    assert idx[valid].tolist() == [0, 1, 3, 4, 5, 6]


def test_assemble_left_aligns_sinks_selection_and_local_window():
    # row 0: no padding; row 1: 3 padded tokens, one selection slot unused
    key_valid = torch.ones(2, 20, dtype=torch.bool)
    key_valid[1, :3] = False
    first = torch.tensor([0, 3])
    mid = torch.tensor([[5, 9, 11], [8, 12, 12]])
    mid_valid = torch.tensor([[True, True, True], [True, True, False]])
    idx, valid = assemble(first, 2, mid, mid_valid, torch.tensor([16, 16]), 20, key_valid)
    assert idx[0].tolist() == [0, 1, 5, 9, 11, 16, 17, 18, 19] and valid[0].all()
    assert idx[1][valid[1]].tolist() == [3, 4, 8, 12, 16, 17, 18, 19]
    assert valid[1].tolist() == [False] + [True] * 8  # invalid first: valid rows end at L - 1
    # a hit keeps an older local window start: the set grows by the tokens added since
    idx, valid = assemble(first, 2, mid, mid_valid, torch.tensor([14, 16]), 20, None)
    assert idx[0].tolist() == [0, 1, 5, 9, 11, 14, 15, 16, 17, 18, 19]


def test_selection_cache_hits():
    query = torch.randn(3, 8)
    state = SelectionState(query.clone(), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.bool),
                           torch.zeros(3, dtype=torch.long))
    assert not cache_hits(None, query, 0.0).any()
    assert cache_hits(state, query, 1.0).all()  # identical: a hit even at theta = 1
    moved = query.clone()
    moved[1] += 0.1
    moved[2] = -query[2]
    assert cache_hits(state, moved, 1.0).tolist() == [True, False, False]
    assert cache_hits(state, moved, 0.9).tolist() == [True, True, False]
    assert cache_hits(state, moved, 0.0).all()  # theta = 0 always reuses
    fresh = SelectionState(moved, torch.ones(3, 3, dtype=torch.long), torch.ones(3, 3, dtype=torch.bool),
                           torch.full((3,), 5))
    merged = merge_rows(torch.tensor([True, False, True]), state, fresh)
    assert merged.mid.shape == (3, 3) and merged.mid_valid[0].tolist() == [True, True, False]
    assert merged.local_start.tolist() == [0, 5, 0] and torch.equal(merged.query[1], moved[1])


@pytest.mark.parametrize("theta,mode", [(0.0, "compact"), (1.0, "original"), (0.5, "compact")])
def test_selection_cache_accounting(theta, mode):
    model, batch = _tiny("llama"), _batch(length=64, pad=5)
    steps, layers, rows = 6, 2, 2
    with tokaccel.patched(model, "tokenselect", k=8, n_init=2, n_local=4, chunk=16, theta=theta, position_mode=mode):
        _run(model, batch, steps=steps)
        counters = tokaccel.stats(model)
    lookups = layers * rows * (steps - 1)  # decode forwards; the first token comes from the prefill
    assert counters["selection_hits"] + counters["selection_misses"] == lookups
    if theta == 0.0:  # one selection per layer and row, then reuse
        assert counters["selection_misses"] == layers * rows
        assert counters["selection_hit_rate"] == pytest.approx((steps - 2) / (steps - 1))
    if theta == 1.0:  # consecutive queries differ: every lookup is a miss
        assert counters["selection_hits"] == 0
