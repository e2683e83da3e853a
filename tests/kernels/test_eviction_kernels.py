"""KV-eviction kernels: decode_attention_probs (decode output + per-KV-head mean probabilities) and
attention_column_sums (the attention each key receives from a prefill's queries, H2O).

* the torch references against naive formulas (K/V repeated per query head, the full softmax
  matrix, fp64): GQA groups 1/3/4/8, N 1/37/300, D 64/80/128, fp32/fp16/bf16, key and query masks,
  causal or not, S = N and S < N, given or computed lse, query tiles smaller than S, query
  weights; probabilities sum to 1 per KV head, column sums add up to the (weighted) valid queries;
  rows without an allowed key contribute 0 (no NaN);
* the Triton kernels against the references under Triton's interpreter (child process with
  TRITON_INTERPRET=1): odd shapes, forced splits, strided caches, causal tile skipping;
* ahead-of-time compilation for sm_80 and sm_90 without spills;
* input validation.
"""
from pathlib import Path

import pytest
import torch

from testkit.kernel_tests import load_worker, triton_kernel_tests
from tokaccel.kernels.ops import HAS_TRITON, attention_column_sums, decode_attention_probs, get_op
from tokaccel.kernels.testing import assert_close

WORKER = Path(__file__).with_name("eviction_interp_worker.py")
KERNEL_NAMES = ["decode_attention_probs", "decode_attention_probs_combine", "attention_lse", "attention_column_sums"]


def _worker():
    return load_worker(WORKER)


# ----------------------------------------------------------------------------- naive formulas


def naive_decode(q, k, v, scale, key_valid):
    """(out [B, H, D] fp64, probs [B, Hk, N] fp64) with K/V repeated to H heads."""
    B, H, D = q.shape
    Hk, N = k.shape[1:3]
    G = H // Hk
    s = torch.einsum("bhd,bhnd->bhn", q.double(), k.double().repeat_interleave(G, 1)) * scale
    if key_valid is not None:
        s = s.masked_fill(~key_valid.repeat_interleave(G, 1), float("-inf"))
    p = s.softmax(-1)
    out = torch.einsum("bhn,bhnd->bhd", p, v.double().repeat_interleave(G, 1))
    return out, p.view(B, Hk, G, N).mean(2)


def naive_colsum(q, k, scale, causal=True, key_valid=None, query_valid=None, query_weight=None, lse=None, **_):
    """colsum [B, Hk, N] fp64 from the full [B, H, S, N] probability matrix."""
    B, H, S, D = q.shape
    Hk, N = k.shape[1:3]
    G = H // Hk
    s = torch.einsum("bhsd,bhnd->bhsn", q.double(), k.double().repeat_interleave(G, 1)) * scale
    allowed = torch.ones(S, N, dtype=torch.bool)
    if causal:
        allowed = allowed.tril(N - S)  # query i sits at key N - S + i
    if key_valid is not None:
        allowed = allowed & key_valid.repeat_interleave(G, 1)[:, :, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    lse = s.logsumexp(-1) if lse is None else lse.double()
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows with no allowed key: 0
    w = torch.ones(B, S, dtype=torch.float64)
    if query_valid is not None:
        w = w * query_valid
    if query_weight is not None:
        w = w * query_weight
    return (p * w[:, None, :, None]).sum(2).view(B, Hk, G, N).mean(2)


# ----------------------------------------------------------------------------- references

DECODE_CASES = [  # G, Hk, N, D, dtype, mask, layout
    (1, 2, 37, 64, "fp32", False, None),
    (3, 2, 300, 80, "fp32", True, None),
    (4, 1, 1, 64, "fp16", False, None),
    (8, 2, 37, 128, "bf16", True, None),
    (3, 1, 300, 64, "fp16", True, "bnhd"),
    (4, 2, 37, 80, "bf16", False, None),
    (8, 1, 300, 64, "fp32", True, None),
    (1, 3, 1, 128, "fp16", True, None),
]


DECODE_IDS = [f"G{G}-Hk{Hk}-N{N}-D{D}-{dt}{'-mask' if m else ''}{'-' + lay if lay else ''}"
              for G, Hk, N, D, dt, m, lay in DECODE_CASES]


@pytest.mark.parametrize("G,Hk,N,D,dtype,mask,layout", DECODE_CASES, ids=DECODE_IDS)
def test_decode_reference_matches_naive(G, Hk, N, D, dtype, mask, layout):
    c = {"B": 2, "G": G, "Hk": Hk, "N": N, "D": D, "dtype": dtype, "mask": mask, "layout": layout}
    q, k, v, scale, key_valid = _worker().decode_inputs(c)
    inputs = [q.clone(), k.clone(), v.clone()]
    out, probs = decode_attention_probs(q, k, v, scale, key_valid, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(inputs, (q, k, v))), "inputs were modified"
    expect_out, expect_probs = naive_decode(q, k, v, scale, key_valid)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert probs.dtype == torch.float32 and probs.shape == k.shape[:3]
    assert_close(out, expect_out, name="out")  # fp32 math rounded to q's dtype
    assert_close(probs, expect_probs, dtype=torch.float32, name="probs")
    assert_close(probs.sum(-1), torch.ones(2, Hk), dtype=torch.float32, name="sum of probs")
    if key_valid is not None:
        assert bool((probs[~key_valid] == 0).all())


COLSUM_CASES = [  # G, Hk, N, S, D, dtype, causal, masks ("", "mask", "leftpad"), lse given, tile, weight
    (1, 2, 37, 37, 64, "fp32", True, "", False, 256, False),
    (3, 2, 37, 37, 80, "fp32", True, "mask", True, 8, False),
    (4, 1, 300, 300, 64, "fp32", True, "mask", False, 64, False),
    (8, 1, 300, 45, 64, "fp16", True, "leftpad", True, 16, True),
    (3, 1, 1, 1, 64, "bf16", True, "", False, 256, False),
    (4, 2, 37, 20, 128, "bf16", False, "mask", False, 7, False),
    (1, 1, 300, 100, 80, "fp16", False, "leftpad", False, 33, False),
    (8, 2, 37, 5, 128, "fp32", True, "leftpad", False, 2, True),
]


def _colsum_case(G, Hk, N, S, D, dtype, causal, masks, lse, tile, weight):
    c = {"B": 2, "G": G, "Hk": Hk, "N": N, "S": S, "D": D, "dtype": dtype, "causal": causal, "mask": masks == "mask",
         "leftpad": min(N - 1, N - S + 3) if masks == "leftpad" else 0, "tile": tile, "weight": weight}
    q, k, scale, kwargs = _worker().colsum_inputs(c)
    if lse:
        kwargs["lse"] = _worker().row_lse(q, k, scale, kwargs)
    return q, k, scale, kwargs


@pytest.mark.parametrize("case", COLSUM_CASES,
                         ids=[f"G{c[0]}-Hk{c[1]}-N{c[2]}-S{c[3]}-D{c[4]}-{c[5]}-{'causal' if c[6] else 'full'}"
                              f"{'-' + c[7] if c[7] else ''}{'-lse' if c[8] else ''}-tile{c[9]}{'-w' if c[10] else ''}"
                              for c in COLSUM_CASES])
def test_colsum_reference_matches_naive(case):
    q, k, scale, kwargs = _colsum_case(*case)
    B, S = q.shape[0], q.shape[2]
    inputs = [q.clone(), k.clone()]
    got = attention_column_sums(q, k, scale, **kwargs, backend="torch")
    assert torch.equal(inputs[0], q) and torch.equal(inputs[1], k), "inputs were modified"
    assert got.dtype == torch.float32 and got.shape == k.shape[:3]
    assert_close(got, naive_colsum(q, k, scale, **kwargs), dtype=torch.float32)
    # every valid query row has an allowed key (key 0, or the first after the padding), so each KV
    # head's sums add up to the (weighted) number of valid queries
    w = torch.ones(B, S)
    if kwargs["query_valid"] is not None:
        w = w * kwargs["query_valid"]
    if kwargs.get("query_weight") is not None:
        w = w * kwargs["query_weight"]
    assert_close(got.sum(-1), w.sum(-1, keepdim=True).expand(B, k.shape[1]), dtype=torch.float32, rtol=1e-5,
                 atol=1e-4, name="sum over keys")
    if kwargs["key_valid"] is not None:
        assert bool((got[~kwargs["key_valid"]] == 0).all())


def test_colsum_tile_and_given_lse_do_not_change_the_result():
    q, k, scale, kwargs = _colsum_case(4, 2, 150, 90, 64, "fp32", True, "mask", False, 256, False)
    base = attention_column_sums(q, k, scale, **kwargs, backend="torch")
    for tile in (1, 7, 64, 90):
        got = attention_column_sums(q, k, scale, **{**kwargs, "tile": tile}, backend="torch")
        assert_close(got, base, name=f"tile {tile}")
    lse = _worker().row_lse(q, k, scale, kwargs)
    assert_close(attention_column_sums(q, k, scale, **kwargs, lse=lse, backend="torch"), base, name="given lse")


def test_rows_without_allowed_keys_contribute_zero():
    """Left padding without query_valid: the first queries see only padding keys (lse -inf)."""
    q, k, scale, kwargs = _colsum_case(3, 2, 40, 40, 64, "fp32", True, "leftpad", False, 16, False)
    dead = ~kwargs.pop("query_valid")
    assert bool(dead.any())
    got = attention_column_sums(q, k, scale, **kwargs, backend="torch")
    assert bool(torch.isfinite(got).all())
    assert_close(got, naive_colsum(q, k, scale, **kwargs), dtype=torch.float32)
    assert_close(got.sum(-1), (~dead).sum(-1, keepdim=True).float().expand(2, 2), dtype=torch.float32, atol=1e-4)
    lse = _worker().row_lse(q, k, scale, kwargs)
    assert bool(torch.isneginf(lse[dead[:, None].expand_as(lse)]).all())
    assert_close(attention_column_sums(q, k, scale, **kwargs, lse=lse, backend="torch"), got, name="given -inf lse")


def test_ops_are_registered_with_triton_launchers():
    for name in ("decode_attention_probs", "attention_column_sums"):
        op = get_op(name)
        assert (op.triton is not None) == HAS_TRITON


def test_bad_inputs_are_rejected():
    q, k, v = torch.zeros(1, 4, 64), torch.zeros(1, 2, 10, 64), torch.zeros(1, 2, 10, 64)
    qs = torch.zeros(1, 4, 3, 64)
    with pytest.raises(ValueError, match=r"expected q \[B, H, D\]"):
        decode_attention_probs(qs, k, v, 0.125)
    with pytest.raises(ValueError, match="H must be a multiple of Hk"):
        decode_attention_probs(torch.zeros(1, 3, 64), k, v, 0.125)
    with pytest.raises(ValueError, match="share one of fp16/bf16/fp32"):
        decode_attention_probs(q, k.half(), v, 0.125)
    with pytest.raises(ValueError, match="share one of fp16/bf16/fp32"):
        decode_attention_probs(q.double(), k.double(), v.double(), 0.125)
    with pytest.raises(ValueError, match=r"key_valid must be bool \(1, 2, 10\)"):
        decode_attention_probs(q, k, v, 0.125, torch.ones(1, 2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_valid must be bool"):
        decode_attention_probs(q, k, v, 0.125, torch.ones(1, 2, 10))
    with pytest.raises(ValueError, match="one device"):
        decode_attention_probs(q, k, v.to("meta"), 0.125)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        decode_attention_probs(q, k, v, None)
    with pytest.raises(ValueError, match="N >= 1"):
        decode_attention_probs(q, k[:, :, :0], v[:, :, :0], 0.125)
    with pytest.raises(ValueError, match=r"expected q \[B, H, S, D\]"):
        attention_column_sums(q, k, 0.125)
    with pytest.raises(ValueError, match="does not match k"):
        attention_column_sums(torch.zeros(1, 4, 3, 32), k, 0.125)
    with pytest.raises(ValueError, match="S <= N"):
        attention_column_sums(torch.zeros(1, 4, 11, 64), k, 0.125)
    with pytest.raises(ValueError, match=r"query_valid must be bool \(1, 3\)"):
        attention_column_sums(qs, k, 0.125, query_valid=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"lse must be float32 \(1, 4, 3\)"):
        attention_column_sums(qs, k, 0.125, lse=torch.zeros(1, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"query_weight must be float32"):
        attention_column_sums(qs, k, 0.125, query_weight=torch.ones(1, 2))
    with pytest.raises(ValueError, match="one device"):
        attention_column_sums(qs, k, 0.125, key_valid=torch.ones(1, 2, 10, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="tile must be a positive int"):
        attention_column_sums(qs, k, 0.125, tile=0)


# ----------------------------------------------------------------------------- Triton (interpreter)


def _cases():
    decode = [  # G, Hk, N, D, dtype, mask, extra
        (1, 2, 37, 64, "fp32", True, {}),
        (3, 2, 300, 80, "fp16", False, {"splits": 5}),
        (4, 1, 1, 64, "bf16", False, {}),
        (8, 2, 150, 128, "bf16", True, {"layout": "bnhd"}),
        (4, 3, 300, 64, "fp32", True, {"splits": 1}),
    ]
    cases = [{"op": "decode", "id": f"decode-G{G}-Hk{Hk}-N{N}-D{D}-{dt}" + ("-mask" if m else "")
              + "".join(f"-{k}{v}" for k, v in x.items()), "B": 2, "G": G, "Hk": Hk, "N": N, "D": D, "dtype": dt,
              "mask": m, "seed": i, **x} for i, (G, Hk, N, D, dt, m, x) in enumerate(decode)]
    colsum = [  # G, Hk, N, S, D, dtype, causal, extra
        (1, 2, 37, 37, 64, "fp32", True, {"mask": True}),
        (3, 2, 70, 20, 80, "fp16", True, {"leftpad": 55, "lse": True, "weight": True}),
        (4, 1, 300, 200, 64, "fp16", True, {"mask": True}),  # causal skips query tiles of late key tiles
        (8, 1, 45, 45, 128, "bf16", False, {"mask": True}),
        (3, 2, 1, 1, 64, "fp32", True, {}),
        (4, 2, 50, 33, 64, "fp32", False, {"leftpad": 20, "weight": True}),
    ]
    cases += [{"op": "colsum", "id": f"colsum-G{G}-Hk{Hk}-N{N}-S{S}-D{D}-{dt}-{'causal' if ca else 'full'}"
               + "".join(f"-{k}{v}" for k, v in x.items()), "B": 2, "G": G, "Hk": Hk, "N": N, "S": S, "D": D,
               "dtype": dt, "causal": ca, "seed": i, **x} for i, (G, Hk, N, S, D, dt, ca, x) in enumerate(colsum)]
    return cases


CASES = _cases()


interp_results, test_triton_matches_reference, test_kernels_compile_for_sm80_and_sm90_without_spills = \
    triton_kernel_tests(WORKER, CASES, KERNEL_NAMES)
