"""TokenSelect's kernels: softmax_head_sum (soft vote), indexed_decode_attention (split-K over an
index set, compact RoPE fused) and indexed_prefill_attention (a causal chunk over an index set).

* the torch references against naive per-row / per-head (/ per-query) loops (in process, no Triton);
* the Triton kernels against the references under Triton's interpreter (child process with
  TRITON_INTERPRET=1, as in test_grouped_scores_interpret.py): odd shapes, GQA groups 1/3/4/8,
  D 64/80/128/256, fp32/fp16/bf16, padding, invalid columns inside the causal tail, fully masked
  query rows, chunks that are not a multiple of the query block, forced splits, strided caches;
* ahead-of-time compilation for sm_80 and sm_90 without spills.
"""
import itertools
from pathlib import Path

import pytest
import torch

from testkit.kernel_tests import load_worker, triton_kernel_tests
from tokaccel.kernels.ops import interpret_enabled, resolve_backend
from tokaccel.kernels.indexed_attention import (gather_rows, indexed_decode_attention, indexed_prefill_attention,
                                                rotate_rows)
from tokaccel.rope import rotate
from tokaccel.kernels.soft_vote import softmax_head_sum, softmax_head_sum_reference

WORKER = Path(__file__).with_name("selection_interp_worker.py")
KERNEL_NAMES = ["softmax_row_stats", "softmax_head_sum", "indexed_decode_attention", "indexed_prefill_attention"]


def _worker():
    return load_worker(WORKER)


# ----------------------------------------------------------------------------- references


def test_softmax_head_sum_reference_matches_a_loop():
    worker = _worker()
    scores, weights = worker.vote_inputs({"B": 2, "R": 5, "N": 31, "masked": True, "weights": True})
    expect = torch.zeros(2, 31, dtype=torch.float64)
    for b in range(2):
        for r in range(5):
            if torch.isfinite(scores[b, r]).any():
                expect[b] += weights[b, r].double() * torch.softmax(scores[b, r].double(), dim=0)
    torch.testing.assert_close(softmax_head_sum_reference(scores.clone(), weights).double(), expect)
    copy = scores.clone()
    torch.testing.assert_close(softmax_head_sum_reference(copy, weights, overwrite=True),
                               softmax_head_sum_reference(scores, weights))
    assert not torch.equal(copy, scores)  # overwrite really reused the buffer
    assert resolve_backend(None, [scores]) == ("triton" if interpret_enabled() else "torch")


def _naive_attention(q, k, v, idx, start, scale, cos, sin):
    B, H, D = q.shape
    G = H // k.shape[1]
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        rows = idx[b, start[b]:]
        L = idx.shape[1]
        for h in range(H):
            keys = k[b, h // G, rows].double()
            query = q[b, h].double()
            if cos is not None:
                positions = torch.arange(start[b], L)
                keys = rotate_rows(keys.float(), cos[positions], sin[positions]).double()
                query = rotate_rows(q[b, h][None].float(), cos[L - 1:L], sin[L - 1:L])[0].double()
            p = torch.softmax(keys @ query * scale, dim=0)
            out[b, h] = p @ v[b, h // G, rows].double()
    return out


@pytest.mark.parametrize("G,Hk,rope", [(3, 3, True), (4, 1, True), (1, 2, False), (8, 2, False)])
def test_indexed_attention_reference_matches_a_loop(G, Hk, rope):
    worker = _worker()
    case = {"B": 2, "G": G, "Hk": Hk, "N": 70, "D": 32, "L": 23, "dtype": "fp32", "rope": rope, "pad": 5,
            "strided": True}
    q, k, v, idx, start, cos, sin = worker.attention_inputs(case)
    got = indexed_decode_attention(q, k, v, idx, start, 0.3, cos, sin)
    torch.testing.assert_close(got.double(), _naive_attention(q, k, v, idx, start, 0.3, cos, sin),
                               rtol=1e-5, atol=1e-6)
    # every column padded: 0, like SDPA on a fully masked row
    empty = indexed_decode_attention(q, k, v, idx, torch.full((2,), 23), 0.3, cos, sin)
    assert torch.equal(empty, torch.zeros_like(empty))
    assert torch.equal(gather_rows(k, idx)[1, :, 4], k[1, :, idx[1, 4]])


def _naive_prefill(q, k, v, idx, col_valid, scale, cos, sin):
    B, H, S, D = q.shape
    G, L = H // k.shape[1], idx.shape[1]
    out = torch.zeros(B, S, H, D, dtype=torch.float64)
    for b in range(B):
        for i in range(S):
            cols = [j for j in range(L) if j <= L - S + i and (col_valid is None or col_valid[b, j])]
            if not cols:
                continue
            cols = torch.tensor(cols)
            for h in range(H):
                keys, query = k[b, h // G, idx[b, cols]].double(), q[b, h, i][None].double()
                if cos is not None:
                    keys = rotate(keys, cos[cols].double(), sin[cols].double())
                    query = rotate(query, cos[L - S + i][None].double(), sin[L - S + i][None].double())
                p = torch.softmax(keys @ query[0] * scale, dim=0)
                out[b, i, h] = p @ v[b, h // G, idx[b, cols]].double()
    return out


@pytest.mark.parametrize("G,Hk,rope,S", [(3, 3, True, 9), (4, 1, True, 23), (1, 2, False, 1), (3, 2, False, 9)])
def test_indexed_prefill_reference_matches_a_loop(G, Hk, rope, S):
    worker = _worker()
    # row 1: its first 16 columns invalid (so with S = 9 its first two queries read nothing), and
    # every 3rd column of the causal tail invalid
    case = {"B": 2, "G": G, "Hk": Hk, "N": 70, "D": 32, "L": 23, "S": S, "dtype": "fp32", "rope": rope,
            "pad": 16, "holes": 3, "strided": True}
    q, k, v, idx, col_valid, cos, sin = worker.prefill_inputs(case)
    assert q.stride(2) == 32 and k.stride(1) == (70 + 29) * 32  # views of longer buffers
    for valid in (col_valid, None):
        got = indexed_prefill_attention(q, k, v, idx, valid, 0.3, cos, sin)
        assert got.shape == (2, S, G * Hk, 32) and got.dtype == q.dtype
        torch.testing.assert_close(got.double(), _naive_prefill(q, k, v, idx, valid, 0.3, cos, sin),
                                   rtol=1e-5, atol=1e-6)
    if S == 9:
        dead = indexed_prefill_attention(q, k, v, idx, col_valid, 0.3, cos, sin)[1, :2]
        assert torch.equal(dead, torch.zeros_like(dead))
    # one query with left-aligned padding is decode: the same numbers as indexed_decode_attention
    start = torch.tensor([0, 16])
    left = torch.arange(23)[None] >= start[:, None]
    last = indexed_prefill_attention(q[:, :, -1:], k, v, idx, left, 0.3, cos, sin)[:, 0]
    torch.testing.assert_close(last, indexed_decode_attention(q[:, :, -1], k, v, idx, start, 0.3, cos, sin))


@pytest.mark.parametrize("rope", [True, False])
def test_permuted_key_columns_read_the_same_attention(rope):
    """Keys stored with each head's dims permuted (FASA's layout) + key_columns: the same outputs
    as the natural layout, decode and prefill (torch reference)."""
    worker = _worker()
    case = {"B": 2, "G": 3, "Hk": 2, "N": 60, "D": 32, "L": 21, "S": 6, "dtype": "fp32", "rope": rope, "pad": 4,
            "strided": True}
    q, k, v, idx, col_valid, cos, sin = worker.prefill_inputs(case)
    stored, cols = worker.permuted_keys(k)
    assert not torch.equal(stored, k) and torch.equal(stored.gather(3, cols[None, :, None].expand(k.shape)), k)
    torch.testing.assert_close(indexed_prefill_attention(q, stored, v, idx, col_valid, 0.3, cos, sin, cols),
                               indexed_prefill_attention(q, k, v, idx, col_valid, 0.3, cos, sin), rtol=0, atol=0)
    start = torch.tensor([0, 4])
    torch.testing.assert_close(indexed_decode_attention(q[:, :, -1], stored, v, idx, start, 0.3, cos, sin, cols),
                               indexed_decode_attention(q[:, :, -1], k, v, idx, start, 0.3, cos, sin), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"key_columns must be int64 \[Hk, D\] = \(2, 32\)"):
        indexed_decode_attention(q[:, :, -1], stored, v, idx, start, 0.3, cos, sin, cols[:1])


def test_bad_inputs_are_refused():
    q, k = torch.zeros(1, 4, 8), torch.zeros(1, 2, 10, 8)
    idx, start = torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="scores must be fp32"):
        softmax_head_sum(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="weights must be fp32 \\(2, 3\\)"):
        softmax_head_sum(torch.zeros(2, 3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="idx must be int64"):
        indexed_decode_attention(q, k, k, idx.int(), start, 1.0)
    with pytest.raises(ValueError, match="multiple of Hk"):
        indexed_decode_attention(torch.zeros(1, 3, 8), k, k, idx, start, 1.0)
    with pytest.raises(ValueError, match="both cos and sin"):
        indexed_decode_attention(q, k, k, idx, start, 1.0, torch.zeros(3, 8))
    with pytest.raises(ValueError, match="P >= L"):
        indexed_decode_attention(q, k, k, idx, start, 1.0, torch.zeros(2, 8), torch.zeros(2, 8))
    q4, valid = torch.zeros(1, 4, 2, 8), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"expected q \[B, H, S, D\]"):
        indexed_prefill_attention(q, k, k, idx, valid, 1.0)
    with pytest.raises(ValueError, match="S <= L"):
        indexed_prefill_attention(torch.zeros(1, 4, 4, 8), k, k, idx, valid, 1.0)
    with pytest.raises(ValueError, match="col_valid must be bool"):
        indexed_prefill_attention(q4, k, k, idx, valid.long(), 1.0)
    with pytest.raises(TypeError, match="col_valid must be a torch.Tensor or None"):
        indexed_prefill_attention(q4, k, k, idx, [True] * 3, 1.0)
    with pytest.raises(ValueError, match="multiple of Hk"):
        indexed_prefill_attention(torch.zeros(1, 3, 2, 8), k, k, idx, valid, 1.0)
    with pytest.raises(ValueError, match="share one of fp16/bf16/fp32"):
        indexed_prefill_attention(q4.half(), k, k, idx, valid, 1.0)
    with pytest.raises(ValueError, match="P >= L"):
        indexed_prefill_attention(q4, k, k, idx, valid, 1.0, torch.zeros(2, 8), torch.zeros(2, 8))


# ----------------------------------------------------------------------------- Triton (interpreter)


def _cases():
    cases = []
    for B, R, N, masked, weights, splits in [(1, 1, 1, False, False, None), (2, 9, 17, True, True, None),
                                            (2, 27, 1000, True, False, None), (1, 12, 5000, True, True, 3),
                                            (3, 4, 2049, False, True, 1), (1, 4, 0, False, False, None)]:
        cases.append({"op": "vote", "id": f"vote-B{B}-R{R}-N{N}" + ("-masked" if masked else "")
                      + ("-w" if weights else "") + (f"-s{splits}" if splits else ""),
                      "B": B, "R": R, "N": N, "masked": masked, "weights": weights, "splits": splits})
    grid = itertools.product((1, 3, 4, 8), (64, 128, 256), ("fp32", "fp16", "bf16"))
    for i, (G, D, dtype) in enumerate(grid):  # every group, head dim and dtype; rope and padding alternate
        rope, pad = i % 2 == 0, (i % 3) * 4
        cases.append({"op": "attn", "id": f"attn-G{G}-D{D}-{dtype}" + ("-rope" if rope else "") + f"-pad{pad}",
                      "B": 2, "G": G, "Hk": 2, "N": 150, "D": D, "L": 37, "dtype": dtype, "rope": rope, "pad": pad})
    cases += [
        {"op": "attn", "id": "attn-L1", "B": 1, "G": 4, "Hk": 1, "N": 9, "D": 64, "L": 1, "dtype": "fp32", "rope": True},
        {"op": "attn", "id": "attn-D80-strided", "B": 2, "G": 3, "Hk": 2, "N": 400, "D": 80, "L": 333,
         "dtype": "fp16", "rope": True, "pad": 40, "strided": True},
        {"op": "attn", "id": "attn-splits5", "B": 2, "G": 4, "Hk": 2, "N": 600, "D": 128, "L": 500,
         "dtype": "bf16", "rope": True, "pad": 100, "splits": 5},
        {"op": "attn", "id": "attn-allpad-row", "B": 2, "G": 2, "Hk": 2, "N": 50, "D": 64, "L": 20,
         "dtype": "fp32", "pad": 20},
        {"op": "attn", "id": "attn-partial-rotary", "B": 1, "G": 2, "Hk": 2, "N": 50, "D": 64, "L": 20,
         "dtype": "fp32", "rope": True, "rot": 32},
        {"op": "attn", "id": "attn-smollm2", "B": 1, "G": 3, "Hk": 3, "N": 3000, "D": 64, "L": 2688,
         "dtype": "fp32", "rope": True},
        {"op": "attn", "id": "attn-permuted-rope", "B": 2, "G": 3, "Hk": 3, "N": 300, "D": 64, "L": 130,
         "dtype": "bf16", "rope": True, "pad": 9, "permuted": True, "splits": 2},
        {"op": "attn", "id": "attn-permuted-plain", "B": 1, "G": 4, "Hk": 2, "N": 90, "D": 128, "L": 40,
         "dtype": "fp16", "permuted": True, "strided": True},
    ]
    grid = itertools.product((1, 3, 4, 8), (64, 128, 256), ("fp32", "fp16", "bf16"))
    for i, (G, D, dtype) in enumerate(grid):  # S 1..45 of L 45; rope, padding and holes alternate
        rope, pad, holes, S = i % 2 == 1, (i % 3) * 8, 3 if i % 4 == 0 else 0, (19, 45, 1, 33)[i % 4]
        cases.append({"op": "prefill", "id": f"prefill-G{G}-D{D}-{dtype}-S{S}" + ("-rope" if rope else "")
                      + f"-pad{pad}" + (f"-holes{holes}" if holes else ""), "B": 2, "G": G, "Hk": max(1, 8 // G),
                      "N": 120, "D": D, "L": 45, "S": S, "dtype": dtype, "rope": rope, "pad": pad, "holes": holes})
    cases += [
        {"op": "prefill", "id": "prefill-D80-strided", "B": 2, "G": 3, "Hk": 2, "N": 300, "D": 80, "L": 200,
         "S": 70, "dtype": "fp16", "rope": True, "pad": 30, "holes": 5, "strided": True},
        {"op": "prefill", "id": "prefill-S-eq-L", "B": 1, "G": 4, "Hk": 1, "N": 150, "D": 64, "L": 130,
         "S": 130, "dtype": "bf16", "rope": True},
        {"op": "prefill", "id": "prefill-dead-rows", "B": 2, "G": 2, "Hk": 2, "N": 60, "D": 64, "L": 40, "S": 20,
         "dtype": "fp32", "rope": True, "pad": 25},  # row 1: queries 0..4 read nothing
        {"op": "prefill", "id": "prefill-valid-all-true", "B": 2, "G": 1, "Hk": 2, "N": 60, "D": 128, "L": 40,
         "S": 7, "dtype": "fp16", "valid": True},
        {"op": "prefill", "id": "prefill-partial-rotary", "B": 1, "G": 2, "Hk": 2, "N": 50, "D": 64, "L": 20, "S": 5,
         "dtype": "fp32", "rope": True, "rot": 32},
        {"op": "prefill", "id": "prefill-smollm2-chunk", "B": 1, "G": 3, "Hk": 1, "N": 900, "D": 64, "L": 700,
         "S": 150, "dtype": "fp32", "rope": True, "pad": 0, "holes": 11},
        {"op": "prefill", "id": "prefill-permuted-rope", "B": 2, "G": 3, "Hk": 3, "N": 200, "D": 64, "L": 90,
         "S": 40, "dtype": "bf16", "rope": True, "pad": 10, "holes": 4, "permuted": True},
        {"op": "prefill", "id": "prefill-permuted-plain", "B": 1, "G": 2, "Hk": 2, "N": 80, "D": 256, "L": 50,
         "S": 17, "dtype": "fp32", "permuted": True, "strided": True},
    ]
    assert len({c["id"] for c in cases}) == len(cases)
    return cases


CASES = _cases()


interp_results, test_triton_matches_reference, test_kernels_compile_for_sm80_and_sm90_without_spills = \
    triton_kernel_tests(WORKER, CASES, KERNEL_NAMES)
