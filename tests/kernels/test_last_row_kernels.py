"""last_row_attention (FastV's score: mean over heads of one query row's softmax over the keys):

* the torch reference against eager attention probabilities (repeat_kv + softmax) and masking;
* the Triton kernels against the reference under Triton's interpreter (child process with
  TRITON_INTERPRET=1): GQA groups 1/3/4/8, N not a multiple of the tile, masked keys (a row with
  half its keys masked), strided keys, fp32/fp16/bf16;
* ahead-of-time compilation for sm_80 and sm_90 without spills.
"""
from pathlib import Path

import pytest
import torch

from testkit.kernel_tests import triton_kernel_tests
from tokaccel.kernels.last_row import last_row_attention

WORKER = Path(__file__).with_name("last_row_interp_worker.py")


def test_reference_is_eager_attention_last_row():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 16, generator=g), torch.randn(2, 2, 11, 16, generator=g)
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, :4] = False
    kk = k.repeat_interleave(3, dim=1)  # HF repeat_kv order: head h reads KV head h // G
    logits = torch.einsum("bhd,bhnd->bhn", q, kk) * 0.25
    want = logits.masked_fill(~valid[:, None], float("-inf")).softmax(-1).mean(1)
    torch.testing.assert_close(last_row_attention(q, k, 0.25, valid), want)
    assert torch.allclose(last_row_attention(q, k, 0.25).sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="valid"):
        last_row_attention(q, k, 0.25, valid.int())


def _cases():
    specs = [(1, 4, 4, 5, 64, "float32", False, False), (2, 9, 3, 130, 64, "float16", True, False),
             (3, 8, 2, 77, 128, "bfloat16", True, True), (1, 8, 1, 200, 32, "float32", True, False)]
    return [{"id": f"B{B}-H{H}-Hk{Hk}-N{N}-D{D}-{dt}{'-valid' if v else ''}{'-strided' if st else ''}",
             "B": B, "H": H, "Hk": Hk, "N": N, "D": D, "dtype": dt, "valid": v, "strided": st, "seed": i}
            for i, (B, H, Hk, N, D, dt, v, st) in enumerate(specs)]


CASES = _cases()


interp_results, test_triton_matches_reference, test_kernels_compile_for_sm80_and_sm90_without_spills = \
    triton_kernel_tests(WORKER, CASES, ["last_row_stats", "last_row_mean"])
