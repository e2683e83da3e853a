"""FASA partial-dim scoring (fc_scores):

* the torch reference against a naive per-row loop, and against full grouped scoring when the
  dims are all of D (in process, no Triton);
* the Triton kernel against the reference under Triton's interpreter (child process with
  TRITON_INTERPRET=1): odd lengths, GQA groups 1/3/4/8, d 8..64 of D 64/128/256, fp32/fp16/bf16,
  strided caches;
* ahead-of-time compilation for sm_80 and sm_90 without spills.
"""
import itertools
from pathlib import Path

import pytest
import torch

from testkit.kernel_tests import load_worker, triton_kernel_tests
from tokaccel.kernels.ops import grouped_scores_reference
from tokaccel.kernels.fc_scores import fc_scores, fc_scores_reference

WORKER = Path(__file__).with_name("fc_scores_interp_worker.py")


def _inputs(**case):
    return load_worker(WORKER).inputs({"B": 2, "G": 3, "Hk": 2, "N": 37, "D": 16, "d": 4, "dtype": "fp32", **case})


def test_reference_matches_a_loop():
    q, keys_dom, dims = _inputs()
    out = fc_scores_reference(q, keys_dom, dims, 0.5)
    assert out.shape == (2, 6, 37)
    for b, r, t in itertools.product(range(2), range(6), (0, 17, 36)):
        hk = r // 3
        want = 0.5 * q[b, r, dims[hk]] @ keys_dom[b, hk, t]
        torch.testing.assert_close(out[b, r, t], want)


def test_all_dims_in_order_equal_full_grouped_scores():
    q, keys, _ = _inputs(d=16)
    dims = torch.arange(16).expand(2, 16).contiguous()
    torch.testing.assert_close(fc_scores(q, keys, dims, 0.25), grouped_scores_reference(q, keys, 0.25))


def test_bad_inputs_are_refused():
    q, keys_dom, dims = _inputs()
    with pytest.raises(ValueError, match="dims must be long"):
        fc_scores(q, keys_dom, dims[:1])
    with pytest.raises(ValueError, match="positive multiple of Hk"):
        fc_scores(q[:, :5], keys_dom, dims)
    with pytest.raises(ValueError, match="keys_dom must be"):
        fc_scores(q, keys_dom[0], dims)


# ----------------------------------------------------------------------------- Triton (interpreter)


def _cases():
    cases = []
    for i, (G, D, dtype) in enumerate(itertools.product((1, 3, 4, 8), (64, 128, 256), ("fp32", "fp16", "bf16"))):
        d = D // 4 if i % 2 == 0 else D // 8
        cases.append({"id": f"G{G}-D{D}-d{d}-{dtype}", "B": 2, "G": G, "Hk": 2, "N": (130, 65, 7)[i % 3], "D": D,
                      "d": d, "dtype": dtype, "strided": i % 2 == 1})
    cases += [{"id": "d2-one-fc", "B": 1, "G": 4, "Hk": 1, "N": 9, "D": 64, "d": 2, "dtype": "fp32"},
              {"id": "smollm2", "B": 1, "G": 3, "Hk": 3, "N": 1000, "D": 64, "d": 16, "dtype": "fp32"}]
    return cases


CASES = _cases()


interp_results, test_triton_matches_reference, test_kernels_compile_for_sm80_and_sm90_without_spills = \
    triton_kernel_tests(WORKER, CASES, ["fc_scores"])
