"""FASA: calibration (well-formed, pairing), exactness vs dense, equality with flat TokenSelect
when every frequency chunk is used, the permuted key layout (dominant dims first, no copy), tree
verification with Token Recycling, errors and registry."""

import functools
import json

import pytest
import torch

import tokaccel
from tokaccel.patch import patch_state
from tokaccel.cache import SelectionLayer
from tokaccel.calibrate import calibrate_fasa, combined_fcs, dominant_fcs, fc_dims, fc_overlap, save_calibration
from tokaccel.policies import FASA, TokenSelect
from tokaccel.kernels.indexed_attention import natural_columns, untile_keys
from tokaccel.policies.fasa import dominant_first, resized

from testkit.models import tiny_model
from testkit.models import padded_batch as _batch
from testkit.models import run_generate as _run

SMALL = dict(n_init=4, n_local=8, chunk=16)
D = 16  # head dim of the tiny models: hidden 64 / 4 heads; D/2 = 8 FCs


@functools.lru_cache(maxsize=None)
def _calibration(pairing="hf", selection="single", **overrides):
    """Calibration dict of the tiny Llama on two random 64-token samples."""
    model = tiny_model("llama", **dict(overrides))
    g = torch.Generator().manual_seed(5)
    samples = [torch.randint(1, 128, (1, 64), generator=g) for _ in range(2)]
    return calibrate_fasa(model, samples, top_k=8, queries=8, pairing=pairing, selection=selection)


@functools.lru_cache(maxsize=None)
def _dense_reference():
    model, batch = tiny_model("llama"), _batch()
    return model, batch, _run(model, batch, steps=4)[:3]


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("selection", ["single", "combined"])
def test_calibration_of_a_tiny_model_is_well_formed(tmp_path, selection):
    cal = _calibration(selection=selection)
    assert (cal["num_layers"], cal["num_kv_heads"], cal["head_dim"], cal["n_fc"], cal["pairing"]) == (2, 2, D, 2, "hf")
    assert cal["selection"] == selection
    assert len(cal["dominant_fcs"]) == 2 and all(len(layer) == 2 for layer in cal["dominant_fcs"])
    for layer, overlaps in zip(cal["dominant_fcs"], cal["overlap"]):
        for fcs, row in zip(layer, overlaps):
            assert len(set(fcs)) == 2 and all(0 <= f < D // 2 for f in fcs)
            assert all(0.0 <= v <= 1.0 for v in row) and len(row) == D // 2
            if selection == "single":  # the n_fc best single overlaps, ascending ids
                assert fcs == sorted(fcs) and min(row[f] for f in fcs) >= max(v for f, v in enumerate(row) if f not in fcs)
            else:  # greedy order: the first pick, alone, is the best single FC
                assert row[fcs[0]] == max(row)
    assert 0.0 < cal["chosen_overlap_mean"] <= 1.0
    assert (0.0 < cal["combined_overlap_mean"] <= 1.0) if selection == "combined" else "combined_overlap_mean" not in cal
    with pytest.raises(ValueError, match="selection='best' is not valid"):
        calibrate_fasa(tiny_model("llama"), [torch.ones(1, 64, dtype=torch.long)], top_k=8, selection="best")
    path = save_calibration(cal, tmp_path / "cal.json")
    assert json.loads(path.read_text())["dominant_fcs"] == cal["dominant_fcs"]


def test_combined_selection_skips_a_chunk_that_repeats_another():
    """Full score a + b: FCs 1 and 3 each carry a / 2, FC 2 carries b (var(a) = 2 var(b)). Alone,
    FC 1 and FC 3 agree best with the full score, so the single ranking keeps both and the pair
    scores like a alone; the greedy choice takes FC 1 and then FC 2, whose sum a / 2 + b agrees far
    better."""
    g = torch.Generator().manual_seed(1)
    N = 512
    a, b = 2 ** 0.5 * torch.randn(N, generator=g), torch.randn(N, generator=g)
    q, k = torch.zeros(1, N, D), torch.zeros(1, N, D)
    q[..., [1, 2, 3]] = 1.0
    k[0, :, 1], k[0, :, 3], k[0, :, 2] = a / 2, a / 2, b
    positions = torch.arange(N - 64, N, 8)
    single = fc_overlap(q, k, positions, 32, "hf")
    assert dominant_fcs(single, 2) == [[1, 3]]
    (chosen,), (summed,) = combined_fcs([(q[:, positions], k)], positions, 2, 32, "hf")
    assert chosen == [1, 2] and summed > 0.65
    full = (a + b)[None].expand(len(positions), -1).masked_fill(torch.arange(N) > positions[:, None], float("-inf"))
    top = full.topk(32, -1).indices
    only_a = a[None].expand(len(positions), -1).masked_fill(torch.arange(N) > positions[:, None], float("-inf"))
    pair_overlap = (only_a.topk(32, -1).indices[:, :, None] == top[:, None]).any(-1).float().mean()
    assert summed > float(pair_overlap) + 0.1


def test_n_fc_other_than_the_calibration_s():
    """single: re-ranked by single-FC overlap; combined: the greedy order's prefix, topped up."""
    overlap = [0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.6, 0.4]
    assert resized([3, 2], overlap, 3, "single") == [1, 3, 6]  # best single overlaps
    assert resized([3, 2], overlap, 1, "combined") == [3]  # a prefix of the greedy order
    assert resized([3, 2], overlap, 4, "combined") == [3, 2, 1, 6]  # then the best single ones
    cal = _calibration(selection="combined")
    model = tiny_model("llama")
    with tokaccel.patched(model, FASA(k=6, n_fc=3, calibration=cal, **SMALL)):
        ctx = patch_state(model).contexts[1]
        expect = [fc_dims(resized(c, row, 3, "combined"), D, "hf") for c, row in zip(cal["dominant_fcs"][1], cal["overlap"][1])]
        assert ctx.state.dims.tolist() == expect


def test_hf_pairing_is_i_and_i_plus_half_and_interleaved_is_adjacent():
    assert fc_dims([1, 3], 16, "hf") == [1, 3, 9, 11]
    assert fc_dims([1, 3], 16, "interleaved") == [2, 3, 6, 7]


def test_pairing_choice_changes_the_dominant_dims():
    """Scores carried only by dims 1 and 1 + D/2 (HF's FC 1): HF pairing finds that chunk alone
    agrees with the full score; the interleaved pairing splits those dims into FCs 0 and 4."""
    g = torch.Generator().manual_seed(0)
    N, H = 64, 2
    q, k = 0.01 * torch.randn(H, N, D, generator=g), 0.01 * torch.randn(1, N, D, generator=g)
    for dim in (1, 1 + D // 2):
        q[:, :, dim] = torch.randn(H, N, generator=g) + 2
        k[:, :, dim] = torch.randn(1, N, generator=g)
    positions = torch.arange(40, 64, 4)
    hf = fc_overlap(q, k, positions, 8, "hf")[0]
    interleaved = fc_overlap(q, k, positions, 8, "interleaved")[0]
    assert int(hf.argmax()) == 1 and hf[1] > 0.9
    assert float(interleaved.max()) < float(hf[1])
    best = int(interleaved.argmax())
    assert fc_dims([1], D, "hf") == [1, 9] and set(fc_dims([best], D, "interleaved")) != {1, 9}


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("mode,dense_fallback", [("compact", True), ("compact", False), ("original", False),
                                               ("auto", False)])
def test_exact_when_budget_covers_context(mode, dense_fallback, monkeypatch):
    """k + n_init + n_local >= context: logits equal dense (fp32, 1e-4), prefill and decode, batch 2
    with left padding; dense_fallback=False runs the partial-dim scorer on the permuted keys."""
    model, batch, (ref_prefill, ref_steps, ref_tokens) = _dense_reference()
    if mode == "auto":  # a trained length one token past the prompt: the cache switches at the second step
        monkeypatch.setattr(model.config, "max_position_embeddings", batch["input_ids"].shape[1] + 1)
    policy = FASA(k=40, position_mode=mode, dense_fallback=dense_fallback, auto_overrun=0,
                  calibration=_calibration(), **SMALL)
    with tokaccel.patched(model, policy):
        prefill, steps, tokens, cache = _run(model, batch, steps=4)
        counters = tokaccel.stats(model)
    assert (counters.get("position_switches", 0) > 0) == (mode == "auto")
    real = batch["attention_mask"].bool()
    assert (prefill - ref_prefill)[real].abs().max() <= 1e-4
    assert (steps - ref_steps).abs().max() <= 1e-4
    assert torch.equal(tokens, ref_tokens)
    assert isinstance(cache.layers[1], SelectionLayer) and not isinstance(cache.layers[0], SelectionLayer)
    assert (counters.get("scored_keys", 0) > 0) == (not dense_fallback)
    layer = cache.layers[1]
    assert layer.key_order is not None and not torch.equal(layer.key_order, torch.arange(D).expand(2, D))


@pytest.mark.parametrize("mode", ["compact", "original"])
def test_all_chunks_equal_flat_tokenselect(mode):
    """n_fc = D/2 scores with every dim: the same selections, hence the same logits, as TokenSelect
    with a budget far below the context (k=6 of 49+ tokens)."""
    model, batch = tiny_model("llama"), _batch()
    small = dict(k=6, position_mode=mode, theta=0.95, **SMALL)
    outputs = []
    for policy in (TokenSelect(**small), FASA(n_fc=D // 2, dense_layers=0, calibration=_calibration(), **small)):
        with tokaccel.patched(model, policy):
            prefill, steps, tokens, _ = _run(model, batch, steps=4)
            outputs.append((prefill, steps, tokens, tokaccel.stats(model)))
    (p0, s0, t0, c0), (p1, s1, t1, c1) = outputs
    assert c0["sparse_calls"] > 0 and c0["selection_misses"] == c1["selection_misses"]
    torch.testing.assert_close(p1, p0, rtol=0, atol=1e-5)
    torch.testing.assert_close(s1, s0, rtol=0, atol=1e-5)
    assert torch.equal(t1, t0)


@pytest.mark.parametrize("mode", ["compact", "original"])
def test_reused_rows_of_the_permuted_cache_equal_a_fresh_gather(mode):
    """reuse_rows on FASA's cache (dims permuted, column tiles on CPU): same logits as gathering
    every row every step."""
    model, batch = tiny_model("llama"), _batch(pad=0)
    outputs = []
    for reuse in (True, False):
        policy = FASA(k=6, theta=0.0, position_mode=mode, reuse_rows=reuse, calibration=_calibration(), **SMALL)
        with tokaccel.patched(model, policy):
            _, steps, tokens, _ = _run(model, batch, steps=5, forward=False)
            outputs.append((steps, tokens, tokaccel.stats(model).get("rows_reused", 0)))
    (s0, t0, reused), (s1, t1, none) = outputs
    assert reused > 0 and none == 0
    torch.testing.assert_close(s0, s1, rtol=0, atol=1e-6)
    assert torch.equal(t0, t1)


def test_partial_scoring_reads_a_quarter_of_the_key_bytes():
    model, batch = tiny_model("llama"), _batch()
    counters = []
    for policy in (TokenSelect(k=6, **SMALL), FASA(k=6, dense_layers=0, calibration=_calibration(), **SMALL)):
        with tokaccel.patched(model, policy):
            _run(model, batch, steps=2, forward=False)
            counters.append(tokaccel.stats(model))
    ts, fasa = counters
    assert fasa["scored_keys"] == ts["scored_keys"] > 0
    score_bytes = ts["scored_keys"] * 2 * D * 4  # 2 KV heads, fp32
    assert fasa["kv_bytes_read"] == ts["kv_bytes_read"] - score_bytes + score_bytes // 4


def test_dominant_first_orders_each_heads_dims():
    dims = torch.tensor([[0, 8, 3, 11], [1, 9, 2, 10]])
    order = dominant_first(dims, D)
    assert order[:, :4].tolist() == dims.tolist()
    assert order[0, 4:].tolist() == [d for d in range(D) if d not in (0, 8, 3, 11)]
    assert torch.equal(order.sort(dim=1).values, torch.arange(D).expand(2, D))


@pytest.mark.parametrize("n_fc", [2, 3])
def test_cache_stores_each_heads_dominant_dims_first_and_nothing_else(n_fc):
    """Original positions, layer 0 dense: layer 1's prompt keys are the dense run's keys, stored
    with each head's dominant dims first; on CPU, when d = 2 * n_fc divides D (n_fc=2: d=4), as
    D/d column tiles whose first is the scorer's contiguous [N, d] block, else (n_fc=3: d=6) as
    rows with the dims leading. Untiled and un-permuted they equal the dense keys exactly, and the
    layer holds only its K and V buffers."""
    model, batch = tiny_model("llama"), _batch()
    *_, dense_cache = _run(model, batch, steps=2, forward=False)
    cal = _calibration()
    with tokaccel.patched(model, FASA(k=6, n_fc=n_fc, position_mode="original", calibration=cal, **SMALL)):
        *_, cache = _run(model, batch, steps=2, forward=False)
        assert tokaccel.stats(model)["scored_keys"] > 0
    layer, n, d = cache.layers[1], batch["input_ids"].shape[1], 2 * n_fc
    dense = dense_cache.layers[1].keys[:, :, :n]
    fcs = [resized(c, row, n_fc, cal["selection"]) for c, row in zip(cal["dominant_fcs"][1], cal["overlap"][1])]
    dims = torch.tensor([fc_dims(f, D, "hf") for f in fcs])
    assert torch.equal(layer.key_order, dominant_first(dims, D))
    assert torch.equal(natural_columns(untile_keys(layer.keys), layer.key_columns)[:, :, :n], dense)
    if n_fc == 2:
        assert layer.key_tile == d and layer.keys.shape[:3] == (2, 2, D // d) and layer.keys.shape[-1] == d
        leading = layer.keys[:, :, 0, :n]
        assert leading.stride()[-2:] == (d, 1)  # one contiguous [N, d] block per head
    else:
        assert layer.key_tile is None and layer.keys.dim() == 4
        leading = layer.keys[:, :, :n, :d]
    assert torch.equal(leading, dense.gather(3, dims[None, :, None].expand(2, 2, n, d)))
    held = [v for v in vars(layer).values() if isinstance(v, torch.Tensor) and v.dim() >= 4]
    assert sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in held}.values()) \
        == layer.allocated_bytes()


def test_a_cache_filled_in_one_key_order_refuses_another():
    model, batch = tiny_model("llama"), _batch()
    with tokaccel.patched(model, FASA(k=6, calibration=_calibration(), **SMALL)):
        *_, cache = _run(model, batch, steps=1, forward=False)
    with tokaccel.patched(model, FASA(k=6, n_fc=3, calibration=_calibration(), **SMALL)):  # other dims first
        with pytest.raises(ValueError, match="another head-dim order"):
            model(input_ids=batch["input_ids"][:, :1], cache=cache)


@pytest.mark.parametrize("mode", ["compact", "original"])
def test_token_recycling_is_identical_to_greedy(mode):
    """Draft trees verified through FASA's sparse path: each node scores the permuted keys, reads
    them un-permuted, and the accepted path's rows move with their layout."""
    from testkit.models import greedy as _greedy
    from testkit.models import random_prompts as _prompts
    from testkit.models import recycled as _recycled
    from tokaccel import recycling

    model = tiny_model("llama")
    with tokaccel.patched(model, FASA(k=6, n_init=2, n_local=8, chunk=8, theta=0.5, position_mode=mode,
                                      calibration=_calibration())):
        for ids in _prompts(3, seed=4):
            ids = ids.repeat(1, 3)
            expect = _greedy(model, ids, max_new_tokens=24, eos_token_id=None)
            for tree in ("auto", 4):
                assert torch.equal(_recycled(model, ids, max_new_tokens=24, eos_token_id=None, tree=tree), expect)
        assert tokaccel.stats(model)["scored_keys"] > 0
    recycling.reset(model)


# ----------------------------------------------------------------------------- errors and registry


def test_missing_calibration_names_the_calibrate_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKACCEL_CACHE", str(tmp_path))
    model = tiny_model("llama")
    with pytest.raises(FileNotFoundError, match=r"tokaccel calibrate --model llama-L2-H64-random --policy fasa"):
        tokaccel.patch_model(model, FASA(k=8))
    with pytest.raises(FileNotFoundError, match=r"--policy fasa --pairing interleaved"):
        tokaccel.patch_model(model, FASA(k=8, pairing="interleaved"))
    assert tokaccel.get_policy(model) is None
    save_calibration({**_calibration(), "model": "llama-L2-H64-random"})  # the default file is found
    with tokaccel.patched(model, FASA(k=8)):
        assert tokaccel.get_policy(model).name == "fasa"


def test_mismatched_calibration_is_refused():
    model = tiny_model("llama", num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"num_kv_heads=2, this model 4; recalibrate with: tokaccel calibrate"):
        tokaccel.patch_model(model, FASA(k=8, calibration=_calibration()))
    with pytest.raises(ValueError, match="pairs dims 'hf', the policy 'interleaved'"):
        tokaccel.patch_model(tiny_model("llama"), FASA(k=8, pairing="interleaved", calibration=_calibration()))
    with pytest.raises(ValueError, match="n_fc=9 exceeds the D/2 = 8 FCs"):
        tokaccel.patch_model(tiny_model("llama"), FASA(k=8, n_fc=9, calibration=_calibration()))


@pytest.mark.parametrize("option,value", [("pairing", "adjacent"), ("n_fc", 0), ("n_fc", True), ("dense_layers", -1),
                                          ("calibration", 3), ("k", 0)])
def test_bad_options_raise_value_error(option, value):
    with pytest.raises(ValueError, match=option):
        FASA(**{option: value})


def test_registered_by_name_with_a_readable_config():
    from tokaccel.policies import make_policy

    policy = make_policy("fasa:k=64,pairing=interleaved")
    assert isinstance(policy, FASA) and policy.pairing == "interleaved" and policy.k == 64
    assert "<dict for" in str(FASA(calibration=_calibration()))


def test_column_tiled_cache_layer_appends_grows_and_edits_like_rows():
    """SelectionLayer with key_tile: appends (past GROW, so the buffer regrows), a crop and a batch
    edit keep exactly the keys a row layout would hold; readers untile and un-permute them."""
    from tokaccel.cache import GROW
    from tokaccel.kernels.indexed_attention import gather_rows, indexed_decode_attention

    g = torch.Generator().manual_seed(3)
    order = torch.stack([torch.randperm(D, generator=g) for _ in range(2)])
    layer = SelectionLayer(pre_rope=False)
    layer.use_key_order(order, tile=4)
    chunks = [torch.randn(3, 2, n, D, generator=g) for n in (5, GROW, 7, 1)]
    for chunk in chunks:
        keys, values = layer.update(chunk, chunk + 1)
    full = torch.cat(chunks, dim=2)
    assert keys.shape == (3, 2, D // 4, full.shape[2], 4) and layer.get_seq_length() == full.shape[2]
    assert torch.equal(natural_columns(untile_keys(keys), layer.key_columns), full)
    layer.crop(-9)
    layer.batch_select_indices(torch.tensor([2, 0]))
    layer.update(chunks[-1][:2], chunks[-1][:2])
    expect = torch.cat((full[[2, 0], :, :-9], chunks[-1][:2]), dim=2)
    assert torch.equal(natural_columns(untile_keys(layer.keys), layer.key_columns), expect)
    idx = torch.tensor([[0, 3, 8, 20], [1, 2, 5, 30]])
    rows = expect.gather(3, order[None, :, None, :].expand(expect.shape))  # the permuted rows, untiled
    assert torch.equal(gather_rows(layer.keys, idx), gather_rows(rows, idx))
    q = torch.randn(2, 4, D, generator=g)
    start = torch.zeros(2, dtype=torch.long)
    tiled = indexed_decode_attention(q, layer.keys, layer.values, idx, start, 0.25, key_columns=layer.key_columns)
    natural = indexed_decode_attention(q, expect, layer.values, idx, start, 0.25)
    torch.testing.assert_close(tiled, natural, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="torch path only"):
        indexed_decode_attention(q, layer.keys, layer.values, idx, start, 0.25, key_columns=layer.key_columns,
                                 backend="triton")
    with pytest.raises(ValueError, match="another head-dim order or layout"):
        layer.use_key_order(order, tile=None)
    with pytest.raises(ValueError, match="multiple of it"):
        SelectionLayer(pre_rope=False).use_key_order(order, tile=6)
