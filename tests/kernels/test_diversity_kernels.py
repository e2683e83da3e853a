"""greedy_select (DivPrune max-min / MMR picks with a running max-similarity vector):

* the torch reference against a brute-force Python max-min / MMR over all pairs;
* the Triton kernel against the reference under Triton's interpreter (child process with
  TRITON_INTERPRET=1): odd N and D (not multiples of the tiles), several sets of different sizes,
  k = n, k = 0, fp32/fp16/bf16, with and without importance, strided features;
* ahead-of-time compilation for sm_80 and sm_90 without spills.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from testkit.kernel_tests import triton_kernel_tests
from tokaccel.kernels.diversity import farthest_first, greedy_select

WORKER = Path(__file__).with_name("diversity_interp_worker.py")


def _brute(x, n, k, first, imp, lam):
    sim = x[:n].float() @ x[:n].float().T
    picked = [first]
    while len(picked) < k:
        def obj(i):
            return (lam * float(imp[i]) if imp is not None else 0.0) - (1 - lam) * max(float(sim[i, j]) for j in picked)
        picked.append(max((i for i in range(n) if i not in picked), key=lambda i: (obj(i), -i)))
    return picked


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_reference_matches_brute_force(lam):
    g = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(2, 40, 12, generator=g), dim=-1)
    n, k = torch.tensor([40, 23]), torch.tensor([9, 23])
    imp = torch.rand(2, 40, generator=g) if lam else None
    first = farthest_first(x, n) if imp is None else imp.masked_fill(torch.arange(40) >= n[:, None], -1).argmax(1)
    got = greedy_select(x, n, k, first, imp, lam)
    for s in range(2):
        want = _brute(x[s], int(n[s]), int(k[s]), int(first[s]), None if imp is None else imp[s], lam)
        assert got[s, : int(k[s])].tolist() == want
        assert (got[s, int(k[s]):] == -1).all()


def test_farthest_first_is_divprune_first_pick():
    g = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(1, 30, 8, generator=g), dim=-1)
    dist = 1 - x[0] @ x[0].T
    dist.fill_diagonal_(float("inf"))
    assert int(farthest_first(x, torch.tensor([30]))[0]) == int(dist.min(1).values.argmax())
    assert int(farthest_first(x, torch.tensor([1]))[0]) == 0


def test_bad_inputs_are_rejected():
    x = torch.zeros(2, 5, 4)
    ok = torch.tensor([5, 5])
    with pytest.raises(ValueError, match="k <= n"):
        greedy_select(x, ok, torch.tensor([6, 1]), ok * 0)
    with pytest.raises(ValueError, match="long"):
        greedy_select(x, ok.int(), ok, ok * 0)
    with pytest.raises(ValueError, match="lam"):
        greedy_select(x, ok, ok, ok * 0, lam=1.5)
    with pytest.raises(ValueError, match="importance"):
        greedy_select(x, ok, ok, ok * 0, torch.zeros(2, 4), 0.5)
    with pytest.raises(ValueError, match=r"\[S, N, D\]"):
        greedy_select(x[0], ok, ok, ok)


def _cases():
    specs = [  # (n per set, k per set, D, dtype, lam, extra padding rows, strided)
        ([1], [1], 3, "float32", 0.0, 0, False),
        ([130, 77, 5], [20, 77, 0], 70, "float32", 0.0, 3, False),
        ([300], [30], 96, "float16", 0.0, 0, False),
        ([200, 199], [30, 199], 64, "bfloat16", 0.0, 0, True),
        ([90, 33], [12, 5], 33, "float32", 0.5, 0, False),
        ([65], [65], 200, "float16", 1.0, 1, False),
    ]
    return [{"id": f"n{'-'.join(map(str, n))}-D{D}-{dt}-lam{lam}{'-strided' if st else ''}", "n": n, "k": k, "D": D,
             "dtype": dt, "lam": lam, "extra": ex, "strided": st, "seed": i}
            for i, (n, k, D, dt, lam, ex, st) in enumerate(specs)]


CASES = _cases()


interp_results, test_triton_matches_reference, test_kernels_compile_for_sm80_and_sm90_without_spills = \
    triton_kernel_tests(WORKER, CASES, ["greedy_select"])
