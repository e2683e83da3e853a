"""Block index kernels (HISA / Quest): block_summaries, block_bound_scores, block_token_scores.

* the torch references against naive per-block / per-head loops (in process, no Triton);
* the Triton kernels against the references under Triton's interpreter (child process with
  TRITON_INTERPRET=1): odd lengths and block sizes, GQA groups 1/3/4/8, D 64/80/128/256,
  fp32/fp16/bf16, padding, empty blocks, a first_block offset, strided caches, blocks past N;
* ahead-of-time compilation for sm_80 and sm_90 without spills.
"""
import itertools
from pathlib import Path

import pytest
import torch

from testkit.kernel_tests import load_worker, triton_kernel_tests
from tokaccel.kernels.block_index import (block_bound_scores, block_summaries, block_summaries_reference,
                                          block_token_scores_reference)

WORKER = Path(__file__).with_name("block_index_interp_worker.py")
KERNEL_NAMES = ["block_summaries", "block_bound_scores", "block_token_scores"]


def _inputs(**case):
    return load_worker(WORKER).inputs({"B": 2, "G": 3, "Hk": 2, "N": 45, "D": 8, "T": 8, "dtype": "fp32", **case})


def test_block_summaries_reference_matches_a_loop():
    keys, valid, _, _ = _inputs(pad=11)
    T, first = 8, 1
    mean, kmax, kmin, count = block_summaries_reference(keys, valid, T, first)
    assert mean.shape == (2, 2, 5, 8) and count.dtype == torch.int32
    for b in range(2):
        for j in range(5):
            rows = torch.arange((first + j) * T, min((first + j + 1) * T, 45))
            rows = rows[valid[b, rows]]
            assert count[b, j] == rows.numel()
            if rows.numel() == 0:  # row 1's first 11 tokens are padding: block 1 of 8..15 keeps 5
                assert not kmax[b, :, j].any() and not kmin[b, :, j].any()
                continue
            torch.testing.assert_close(mean[b, :, j], keys[b][:, rows].mean(1))
            assert torch.equal(kmax[b, :, j], keys[b][:, rows].amax(1))
            assert torch.equal(kmin[b, :, j], keys[b][:, rows].amin(1))


def test_block_token_scores_reference_matches_a_loop():
    keys, _, q, blocks = _inputs(overhang=True)
    out = block_token_scores_reference(q, keys, blocks, 8, 0.5)
    for b, h, (j, blk) in itertools.product(range(2), range(6), enumerate(blocks[0].tolist())):
        blk = int(blocks[b, j])
        for i in range(8):
            t = blk * 8 + i
            want = 0.5 * q[b, h] @ keys[b, h // 3, t] if t < 45 else float("-inf")
            torch.testing.assert_close(out[b, h, j * 8 + i], torch.as_tensor(want, dtype=torch.float32))


def test_bad_inputs_are_refused():
    keys, valid, q, _ = _inputs(pad=3)
    with pytest.raises(ValueError, match="block size must be a positive integer"):
        block_summaries(keys, valid, 0)
    with pytest.raises(ValueError, match="first_block must be an integer >= 0"):
        block_summaries(keys, valid, 8, -1)
    with pytest.raises(ValueError, match="valid must be None or bool"):
        block_summaries(keys, valid.long(), 8)
    _, kmax, kmin, _ = block_summaries(keys, None, 8)
    with pytest.raises(ValueError, match="positive multiple of KV heads"):
        block_bound_scores(q[:, :5], kmax, kmin)
    with pytest.raises(ValueError, match="kmin must match kmax"):
        block_bound_scores(q, kmax, kmin[:, :, :2])


# ----------------------------------------------------------------------------- Triton (interpreter)


def _cases():
    cases = []
    for i, (G, D, dtype) in enumerate(itertools.product((1, 3, 4, 8), (64, 128, 256), ("fp32", "fp16", "bf16"))):
        T = (16, 64, 7)[i % 3]
        pad = (None, 5, 40)[i % 3]
        cases.append({"id": f"G{G}-D{D}-{dtype}-T{T}-pad{pad}", "B": 2, "G": G, "Hk": 2, "N": 130, "D": D, "T": T,
                      "dtype": dtype, "pad": pad, "first": i % 2, "M": 3, "overhang": i % 2 == 0})
    cases += [
        {"id": "D80-strided", "B": 2, "G": 3, "Hk": 2, "N": 300, "D": 80, "T": 128, "dtype": "fp16", "pad": 150,
         "strided": True, "M": 2, "overhang": True},
        {"id": "T1", "B": 1, "G": 4, "Hk": 1, "N": 9, "D": 64, "T": 1, "dtype": "fp32", "M": 9},
        {"id": "all-empty-first", "B": 2, "G": 2, "Hk": 1, "N": 40, "D": 64, "T": 16, "dtype": "bf16", "pad": 35,
         "first": 2},
        {"id": "smollm2", "B": 1, "G": 3, "Hk": 3, "N": 1000, "D": 64, "T": 64, "dtype": "fp32", "M": 8},
    ]
    assert len({c["id"] for c in cases}) == len(cases)
    return cases


CASES = _cases()


interp_results, test_triton_matches_reference, test_kernels_compile_for_sm80_and_sm90_without_spills = \
    triton_kernel_tests(WORKER, CASES, KERNEL_NAMES)
