"""TokenSelect: exactness vs dense, selection, the soft vote, the selection cache, one copy of K, errors."""

import copy
import dataclasses

import pytest
import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import tokaccel
from tokaccel.cache import GROW, SelectionLayer
from tokaccel.policies import TokenSelect
from tokaccel.rope import RopeTable, find_rotary_embedding, rotate, unrotate
from tokaccel.selection import SelectionState, assemble, cache_hits, merge_rows, soft_vote, top_k

from testkit.models import padded_batch as _batch
from testkit.models import passkey_ids as _passkey_ids
from testkit.models import run_generate as _run
from testkit.models import tiny_model

KINDS = ["llama", "qwen2", "mistral", "gemma3"]


def _tiny(kind):
    # Mistral's tiny config slides over 8 tokens everywhere; full attention is what TokenSelect runs on.
    return tiny_model(kind, sliding_window=None) if kind == "mistral" else tiny_model(kind)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["compact", "original", "auto"])
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
    """The real SmolLM2 (GQA 3) and Gemma3 (MQA, D=256, 3 global of 18 layers): the sparse path
    with a covering budget equals dense in both position modes, batch 2 with left padding."""
    model, tokenizer = request.getfixturevalue(name)
    tokenizer.padding_side = "left"
    batch = tokenizer(["The quick brown fox jumps over the lazy dog because it wanted to see the", "Paris is"],
                      return_tensors="pt", padding=True)
    _, ref_steps, ref_tokens, _ = _run(model, batch, steps=3, forward=False)
    for mode in ("compact", "original"):
        with tokaccel.patched(model, "tokenselect", k=64, n_init=2, n_local=4, chunk=8, position_mode=mode,
                              dense_fallback=False):
            _, steps, tokens, cache = _run(model, batch, steps=3, forward=False)
            counters = tokaccel.stats(model)
        assert (steps - ref_steps).abs().max() <= 1e-4, mode
        assert torch.equal(tokens, ref_tokens), mode
        assert counters["sparse_calls"] > 0
    kinds = {type(layer) for layer in cache.layers}
    assert kinds == ({SelectionLayer, DynamicSlidingWindowLayer} if name == "gemma3" else {SelectionLayer})


@pytest.mark.parametrize("mode", ["compact", "original"])
@pytest.mark.parametrize("pad", [0, 9])
def test_leading_chunks_that_fit_the_budget_are_dense(mode, pad):
    """Context > budget: the prompt's leading chunks, whose context fits the budget, are one dense
    read (plain causal SDPA when nothing is padded), so their logits equal dense; later ones differ."""
    model, batch = _tiny("llama"), _batch(length=64, pad=pad)
    with torch.no_grad():
        ref = model(**batch).logits
        with tokaccel.patched(model, "tokenselect", k=8, n_init=4, n_local=8, chunk=16, position_mode=mode):
            got = model(**batch).logits
    dense_part = 32  # chunks of 16 start at 0, 16, 32; one dense read takes them while their start <= budget 20
    real = batch["attention_mask"].bool()
    assert (got - ref)[:, :dense_part][real[:, :dense_part]].abs().max() <= 1e-4
    assert (got - ref)[:, dense_part:].abs().max() > 1e-3


def test_exact_without_a_cache():
    """use_cache=False: no cache layer; compact mode un-rotates the call's own keys."""
    model, batch = _tiny("llama"), _batch()
    with torch.no_grad():
        ref = model(**batch, use_cache=False).logits
        for mode in ("compact", "original"):
            with tokaccel.patched(model, "tokenselect", k=40, n_init=4, n_local=8, chunk=16, position_mode=mode,
                                  dense_fallback=False):
                got = model(**batch, use_cache=False).logits
            assert (got - ref)[batch["attention_mask"].bool()].abs().max() <= 1e-4, mode


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("dense_fallback", [True, False])
def test_auto_positions_switch_to_compact_past_the_trained_length(kind, dense_fallback):
    """position_mode="auto" with a trained length of 42 and auto_overrun=2: the 40-token prompt
    (batch 2, left padding) runs with original positions, the 5th decode step takes the cache past
    44 and every layer switches to pre-RoPE keys, un-rotated in place at the positions HF gave them.
    With a covering budget the logits equal dense before and after the switch."""
    model, batch = tiny_model(kind, max_position_embeddings=42), _batch()
    _, ref_steps, ref_tokens, _ = _run(model, batch, steps=8, forward=False)
    policy = TokenSelect(k=48, n_init=4, n_local=8, chunk=16, position_mode="auto", auto_overrun=2,
                         dense_fallback=dense_fallback)
    with tokaccel.patched(model, policy):
        _, steps, tokens, cache = _run(model, batch, steps=8, forward=False)
        counters = tokaccel.stats(model)
    assert (steps - ref_steps).abs().max() <= 1e-4
    assert torch.equal(tokens, ref_tokens)
    layers = [layer for layer in cache.layers if isinstance(layer, SelectionLayer)]
    assert layers and all(layer.pre_rope for layer in layers)
    assert counters["position_switches"] == len(layers)
    for trained_length, overrun in ((64, 0), (42, 6)):  # the sequence (48) stays within: no switch
        model.config.max_position_embeddings = trained_length
        with tokaccel.patched(model, dataclasses.replace(policy, auto_overrun=overrun)):
            _, steps, _, cache = _run(model, batch, steps=8, forward=False)
            assert tokaccel.stats(model).get("position_switches", 0) == 0
        assert (steps - ref_steps).abs().max() <= 1e-4
        assert not any(layer.pre_rope for layer in cache.layers if isinstance(layer, SelectionLayer))


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_auto_within_its_overrun_runs_original_positions(kind):
    """A prompt that fills the trained length (40) decoded 8 steps past it, within auto_overrun:
    with a budget far below the context (the sparse path selects), auto gives original mode's
    logits bit for bit and switches no layer."""
    model, batch = tiny_model(kind, max_position_embeddings=40), _batch()
    results = {}
    for mode in ("original", "auto"):
        with tokaccel.patched(model, TokenSelect(k=6, n_init=2, n_local=4, chunk=8, position_mode=mode, auto_overrun=8,
                                                 dense_fallback=False)):
            results[mode] = _run(model, batch, steps=8)
            assert tokaccel.stats(model).get("position_switches", 0) == 0
    for original, auto in zip(results["original"][:3], results["auto"][:3]):
        assert torch.equal(original, auto)


def test_auto_positions_switch_inside_a_chunked_prefill():
    """The prompt fed in two forwards (24 + 16 tokens, trained length 30): the second one switches
    the filled cache; the sparse path's logits equal dense over both."""
    model, batch = tiny_model("llama", max_position_embeddings=30), _batch(pad=0)
    ids, cache_kwarg = batch["input_ids"], tokaccel.cache.cache_kwarg(model)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with tokaccel.patched(model, "tokenselect", k=40, n_init=4, n_local=8, chunk=8, position_mode="auto",
                              auto_overrun=0, dense_fallback=False):
            cache = DynamicCache(config=model.config)
            first = model(input_ids=ids[:, :24], use_cache=True, **{cache_kwarg: cache}).logits
            assert not cache.layers[0].pre_rope
            second = model(input_ids=ids[:, 24:], use_cache=True, **{cache_kwarg: cache}).logits
    assert all(layer.pre_rope for layer in cache.layers)
    assert (torch.cat((first, second), 1) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("layout", ["rows", "permuted", "tiles"])
def test_switching_a_layer_to_pre_rope_keys(layout):
    """SelectionLayer.to_pre_rope un-rotates the stored keys in place, in every storage layout, and
    drops the state built from rotated keys; later appends are un-rotated as usual."""
    B, Hk, N, D = 2, 2, 10, 8
    keys, values = torch.randn(B, Hk, N + 1, D), torch.randn(B, Hk, N + 1, D)
    angles = torch.rand(B, N + 1, D // 2) * 6
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)
    rotated = rotate(keys, cos, sin)
    order = None if layout == "rows" else torch.stack([torch.randperm(D) for _ in range(Hk)])
    tile = 4 if layout == "tiles" else None
    layer, reference = SelectionLayer(pre_rope=False), SelectionLayer(pre_rope=True)
    for target in (layer, reference):
        target.use_key_order(order, tile)
    layer.update(rotated[:, :, :N], values[:, :, :N])
    reference.incoming_rope = (cos[:, :N], sin[:, :N])
    reference.update(rotated[:, :, :N], values[:, :, :N])
    layer.selection = layer.block_index = "built from rotated keys"
    layer.to_pre_rope(cos[:, :N], sin[:, :N])
    assert layer.pre_rope and layer.selection is None and layer.block_index is None
    torch.testing.assert_close(layer.keys, reference.keys, rtol=0, atol=1e-6)
    for target in (layer, reference):
        target.incoming_rope = (cos[:, N:], sin[:, N:])
        target.update(rotated[:, :, N:], values[:, :, N:])
    torch.testing.assert_close(layer.keys, reference.keys, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.values, values)


def test_forward_with_autograd_enabled():
    """A plain forward (grad mode on, as outside generate) runs the sparse prefill and decode paths
    and gives the no-grad logits (selection is for inference: backward is not supported)."""
    model, batch = _tiny("llama"), _batch(pad=0)
    cache_kwarg = tokaccel.cache.cache_kwarg(model)
    with tokaccel.patched(model, "tokenselect", k=8, n_init=4, n_local=8, chunk=16, dense_fallback=False):
        out = model(**batch, use_cache=True)
        step = model(input_ids=batch["input_ids"][:, -1:], **{cache_kwarg: out.past_key_values})
        with torch.no_grad():
            ref = model(**batch, use_cache=True)
            ref_step = model(input_ids=batch["input_ids"][:, -1:], **{cache_kwarg: ref.past_key_values})
    assert (out.logits - ref.logits).abs().max() <= 1e-5 and (step.logits - ref_step.logits).abs().max() <= 1e-5


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


def test_last_prompt_chunk_votes_with_its_tail_queries(monkeypatch):
    """Chunks select with their mean query, except the chunk holding the prompt's last token,
    which sums the per-query votes of its last `tail` queries (tail=0: the paper's mean)."""
    seen = []
    original = TokenSelect.vote

    def spy(self, q, keys, scale, valid, query_valid=None):
        seen.append(tuple(q.shape))
        return original(self, q, keys, scale, valid, query_valid)

    monkeypatch.setattr(TokenSelect, "vote", spy)
    model = _tiny("llama")
    ids = torch.randint(1, 128, (1, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for tail, last in ((5, (1, 4, 5, 16)), (0, (1, 4, 16))):
            seen.clear()
            with tokaccel.patched(model, "tokenselect", k=4, n_init=2, n_local=4, chunk=16, tail=tail):
                model(ids)
            per_layer = seen[:len(seen) // 2]  # 2 layers, same shapes
            assert per_layer[:-1] == [(1, 4, 16)] * (len(per_layer) - 1)  # mean query per chunk
            assert per_layer[-1] == last


def test_stored_keys_are_one_pre_rope_copy():
    """Compact mode stores un-rotated keys: rotating them back gives dense's cache; the layer holds
    one copy (plus at most GROW tokens of headroom), never K twice. (A covering budget, so that
    both runs compute the same keys in every layer.)"""
    model, batch = _tiny("llama"), _batch(length=300, pad=9)
    _, _, _, dense_cache = _run(model, batch, steps=3, forward=False)
    with tokaccel.patched(model, "tokenselect", k=300, n_init=4, n_local=8, chunk=64) as patched_model:
        _, _, _, cache = _run(patched_model, batch, steps=3, forward=False)
        rope = patched_model.model.layers[0].self_attn.__dict__["_tokaccel_ctx"].state.rope
    positions = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)
    positions = torch.cat((positions, positions[:, -1:] + torch.arange(1, 3)), dim=1)  # 2 decode steps
    for dense, layer in zip(dense_cache.layers, cache.layers):
        assert isinstance(layer, SelectionLayer) and type(dense) is DynamicLayer
        assert layer.keys.shape == dense.keys.shape and layer.keys.nbytes == dense.keys.nbytes
        assert dense.keys.nbytes + dense.values.nbytes <= layer.allocated_bytes()
        assert layer.allocated_bytes() <= dense.keys.nbytes + dense.values.nbytes + 2 * 2 * 2 * 16 * 4 * GROW
        cos, sin = rope(int(positions.max()) + 1, torch.device("cpu"), torch.float32)
        rotated = rotate(layer.keys, cos[positions], sin[positions])
        real = torch.cat((batch["attention_mask"], torch.ones(2, 2, dtype=torch.long)), 1).bool()
        torch.testing.assert_close(rotated.transpose(1, 2)[real], dense.keys.transpose(1, 2)[real],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.values, dense.values)


def test_rope_unrotate_inverts_rotate():
    model = _tiny("llama")
    rotary = find_rotary_embedding(model, model.model.layers[0].self_attn.config)
    assert rotary is model.model.rotary_emb
    positions = torch.tensor([[0, 5, 17, 300], [3, 3, 9, 511]])
    probe = torch.empty(0)
    cos, sin = rotary(probe, positions)
    k = torch.randn(2, 2, 4, 16)
    torch.testing.assert_close(unrotate(rotate(k, cos, sin), cos, sin), k, rtol=0, atol=2e-6)
    # the table reproduces the model's own cos/sin; a scaled rope (attention_scaling != 1) inverts too
    table_cos, table_sin = RopeTable(rotary)(512, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(table_cos[positions], cos)
    torch.testing.assert_close(table_sin[positions], sin)
    torch.testing.assert_close(unrotate(rotate(k, 1.3 * cos, 1.3 * sin), 1.3 * cos, 1.3 * sin, scaling=1.3), k,
                               rtol=0, atol=5e-6)
    # partial rotary (R < D): the remaining dims pass through
    cos8, sin8 = (torch.cat((t[..., :4], t[..., :4]), dim=-1) for t in (cos, sin))  # 4 pairs of dims
    part = rotate(k, cos8, sin8)
    assert torch.equal(part[..., 8:], k[..., 8:])
    torch.testing.assert_close(unrotate(part, cos8, sin8), k, rtol=0, atol=2e-6)
    # Gemma3's rotary takes a layer type; the table passes it
    gemma = _tiny("gemma3")
    table = RopeTable(gemma.model.rotary_emb, "full_attention")
    cos_g, _ = gemma.model.rotary_emb(probe, positions, "full_attention")
    torch.testing.assert_close(table(512, torch.device("cpu"), torch.float32)[0][positions], cos_g)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("config,match", [
    ({"k": 0}, r"k=0 .*integer >= 1"),
    ({"k": -5}, r"k=-5 .*integer >= 1"),
    ({"k": 2.5}, r"k=2.5 .*integer >= 1"),
    ({"theta": 1.5}, r"theta=1.5 .*\[0, 1\]"),
    ({"theta": -0.1}, r"theta=-0.1 .*\[0, 1\]"),
    ({"chunk": 0}, r"chunk=0 .*integer >= 1"),
    ({"n_init": -1}, r"n_init=-1 .*integer >= 0"),
    ({"n_local": 0}, r"n_local=0 .*integer >= 1"),
    ({"pool": 4}, r"pool=4 .*odd integer"),
    ({"tail": -1}, r"tail=-1 .*integer >= 0"),
    ({"auto_overrun": -1}, r"auto_overrun=-1 .*integer >= 0"),
    ({"position_mode": "absolute"}, r"position_mode='absolute' .*compact.*original"),
    ({"head_mapping": "mod"}, r"head_mapping='mod' .*group.*release_mod"),
    ({"dense_fallback": "yes"}, r"dense_fallback='yes'"),
    ({"reuse_rows": 1}, r"reuse_rows=1 .*bool"),
])
def test_bad_config_is_refused(config, match):
    with pytest.raises(ValueError, match=match):
        TokenSelect(**config)
    with pytest.raises(ValueError, match=match):
        tokaccel.patch_model(_tiny("llama"), "tokenselect", **config)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['kk'\]"):
        tokaccel.make_policy("tokenselect:kk=3")


def test_defaults_and_registry():
    policy = tokaccel.make_policy("tokenselect:k=1024,theta=0.8")
    assert isinstance(policy, TokenSelect) and policy.k == 1024 and policy.theta == 0.8
    assert "tokenselect" in tokaccel.policies()
    default = TokenSelect()
    assert (default.k, default.n_init, default.n_local, default.chunk, default.theta) == (2048, 128, 512, 512, 0.9)
    assert default.position_mode == "compact" and default.head_mapping == "group" and default.pool is None
    assert default.budget == 2048 + 128 + 512


def test_unsupported_models_and_caches_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    with pytest.raises(NotImplementedError, match="rotary embedding.*position_mode='original'"):
        tokaccel.patch_model(gpt2, "tokenselect")
    assert tokaccel.get_policy(gpt2) is None  # a failed patch leaves the model as it was
    model, batch = _tiny("llama"), _batch()
    with torch.no_grad(), tokaccel.patched(model, "tokenselect", k=4, n_init=2, n_local=4):
        with pytest.raises(ValueError, match="StaticLayer.*dynamic cache"):
            model(**batch, past_key_values=StaticCache(config=model.config, max_cache_len=64))
    filled = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**batch, past_key_values=filled)  # written without tokaccel
        with tokaccel.patched(model, "tokenselect", k=4, n_init=2, n_local=4):
            with pytest.raises(ValueError, match="already holds 40 tokens written without tokaccel"):
                model(input_ids=batch["input_ids"][:, :1], past_key_values=filled)


def test_batch_with_mixed_hits_and_misses(monkeypatch):
    """Row 0 reuses its selection while row 1 re-selects (merge_rows): row 0 keeps its old local
    window start and grows by one token per step; the accounting is per row."""
    from tokaccel.policies import engine as module

    def first_row_hits(state, query, theta):
        return cache_hits(state, query, theta) if state is None else torch.tensor([True, False])

    monkeypatch.setattr(module, "cache_hits", first_row_hits)
    model, batch = _tiny("qwen2"), _batch(length=80, pad=30)
    steps, layers = 6, 2
    with tokaccel.patched(model, "tokenselect", k=8, n_init=2, n_local=4, chunk=32):
        _, logits, tokens, cache = _run(model, batch, steps=steps, forward=False)
        counters = tokaccel.stats(model)
    assert torch.isfinite(logits).all()
    assert counters["selection_hits"] == layers * (steps - 2)
    assert counters["selection_misses"] == layers * (2 + steps - 2)
    state = cache.layers[0].selection
    n = cache.layers[0].get_seq_length()
    assert state.local_start.tolist() == [n - 4 - (steps - 2), n - 4]  # row 0: window of the first step


@pytest.mark.parametrize("kind,mode,theta", [("llama", "compact", 0.0), ("llama", "original", 0.0),
                                              ("gemma3", "compact", 0.5), ("qwen2", "original", 0.0)])
def test_reused_rows_equal_a_fresh_gather(kind, mode, theta):
    """reuse_rows: a hit gathers only the rows its index set gained since the last step; the
    logits and tokens equal gathering every row every step (batch 2, one row padded)."""
    model, batch = _tiny(kind), _batch(length=72, pad=11)
    outputs = []
    for reuse in (True, False):
        policy = TokenSelect(k=8, n_init=2, n_local=6, chunk=16, theta=theta, position_mode=mode, reuse_rows=reuse)
        with tokaccel.patched(model, policy):
            _, steps, tokens, cache = _run(model, batch, steps=8, forward=False)
            outputs.append((steps, tokens, tokaccel.stats(model)))
    (s0, t0, c0), (s1, t1, c1) = outputs
    assert c0["selection_hits"] > 0 and c0["selection_hits"] == c1["selection_hits"]
    assert c0["rows_reused"] > 0 and c1.get("rows_reused", 0) == 0
    if theta == 0.0:  # every step after the first decode one hits: all but one new column per row reused
        assert c0["rows_reused"] >= c0["selection_hits"] * (policy.budget - 1)
    torch.testing.assert_close(s0, s1, rtol=0, atol=1e-6)
    assert torch.equal(t0, t1)


def test_a_miss_rebuilds_the_reused_rows_and_cache_edits_drop_them():
    model, batch = _tiny("llama"), _batch(length=64, pad=0)
    options = dict(k=8, n_init=2, n_local=6, chunk=16, theta=0.5)
    with tokaccel.patched(model, "tokenselect", **options):
        _, _, tokens, cache = _run(model, batch, steps=4, forward=False)
    layer = cache.layers[0]
    assert (layer.selection.rows.idx[:, -1] == layer.get_seq_length() - 1).all()  # the last step's rows
    reference = copy.deepcopy(cache)
    for edited in (cache, reference):
        for each in edited.layers:
            each.selection.query = -each.selection.query  # cos = -1: the next step misses
    for each in cache.layers:
        each.selection.rows.keys.zero_()  # stale rows: a miss must not read them
    logits = []
    for steps_cache, reuse in ((cache, True), (reference, False)):
        with torch.no_grad(), tokaccel.patched(model, "tokenselect", reuse_rows=reuse, **options):
            logits.append(model(input_ids=tokens[:, -1:], past_key_values=steps_cache).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-6)
    cache.crop(-1)  # an edit drops the selection, its rows with it
    assert layer.selection is None


def test_beam_search_lazy_cache_and_continued_generation():
    """Beam search (reorder_cache), a cache built without a config (layers appear lazily), and a
    second generate on the same cache (a prefill with past tokens): all equal dense."""
    model, batch = _tiny("llama"), _batch(length=60)
    more_ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(5))

    def run():
        beams = model.generate(**batch, max_new_tokens=5, num_beams=3, do_sample=False)
        cache = DynamicCache()
        first = model.generate(**batch, max_new_tokens=5, do_sample=False, past_key_values=cache)
        ids = torch.cat((first, more_ids), dim=1)
        mask = torch.cat((batch["attention_mask"], torch.ones(2, 12, dtype=torch.long)), dim=1)
        second = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                past_key_values=cache)
        return beams, second, cache

    with torch.no_grad():
        ref_beams, ref_second, _ = run()
        for mode in ("compact", "original"):
            with tokaccel.patched(model, "tokenselect", k=100, n_init=2, n_local=4, chunk=16, position_mode=mode,
                                  dense_fallback=False):
                beams, second, cache = run()
            assert torch.equal(beams, ref_beams) and torch.equal(second, ref_second), mode
            assert all(isinstance(layer, SelectionLayer) for layer in cache.layers)


def test_sliding_window_only_model_is_refused():
    """Mistral's tiny config slides over 8 tokens in every layer: no layer for TokenSelect, so it
    refuses clearly (dense still patches, and keeps the window)."""
    model, batch = tiny_model("mistral"), _batch()
    with pytest.raises(NotImplementedError, match="tokenselect: no layer"):
        tokaccel.patch_model(model, "tokenselect", k=4, n_init=2, n_local=4, chunk=8)
    assert tokaccel.get_policy(model) is None
    ref_prefill, ref_steps, ref_tokens, _ = _run(model, batch)
    with tokaccel.patched(model, "dense"):
        prefill, steps, tokens, cache = _run(model, batch)
        counters = tokaccel.stats(model)
    assert counters["dense_calls"] > 0 and counters["keys_read"] < counters["query_tokens"] * batch["input_ids"].shape[1]
    assert torch.equal(tokens, ref_tokens) and (steps - ref_steps).abs().max() <= 1e-5


def test_passkey_with_a_small_budget(smollm2):
    """Real SmolLM2, ~1.45K tokens, k=256 (896 tokens read per step): the pass key sits at depth
    0.5 (token ~720), outside the decode steps' local window, and is still found (dense finds it
    too; dense SmolLM2 misses depths 0.1 and 0.3 at this length); the selection cache hits."""
    model, tokenizer = smollm2
    ids = _passkey_ids(tokenizer, 1500, 0.5, "15306")
    n = ids["input_ids"].shape[1]
    with torch.no_grad(), tokaccel.patched(model, "tokenselect", k=256):
        out = model.generate(**ids, max_new_tokens=7, do_sample=False)
        counters = tokaccel.stats(model)
    assert "15306" in tokenizer.decode(out[0, n:]), tokenizer.decode(out[0, n:])
    assert counters["keys_read_per_call"] < n
    assert 0 < counters["selection_hit_rate"] < 1
