"""Runs greedy_select Triton-vs-reference cases; meant for a process with TRITON_INTERPRET=1
(see interp_worker.py for why).

Usage: python diversity_interp_worker.py CASES.json RESULTS.json (test_diversity_kernels.py drives it).
"""


def inputs(c):
    """x [S, N, D] unit rows (padding rows random too), n, k, first, importance or None."""
    import torch
    import torch.nn.functional as F

    from tokaccel.kernels.diversity import farthest_first

    g = torch.Generator().manual_seed(c.get("seed", 0))
    ns = c["n"]
    S, N = len(ns), max(ns)
    x = F.normalize(torch.randn(S, N + c.get("extra", 0), c["D"], generator=g), dim=-1)
    x = x.to(getattr(torch, c["dtype"]))
    n = torch.tensor(ns)
    k = torch.tensor(c["k"])
    imp = torch.rand(S, x.shape[1], generator=g) if c["lam"] > 0 else None
    pad = torch.arange(x.shape[1]) >= n[:, None]
    first = farthest_first(x, n) if imp is None else imp.masked_fill(pad, -1).argmax(1)
    if c.get("strided"):
        x = torch.cat([x, x], -1)[..., : c["D"]]
    return x, n, k, first, imp


def run_cases(cases):
    import torch

    from tokaccel.kernels.ops import interpret_enabled
    from tokaccel.kernels.diversity import greedy_select, greedy_select_reference
    from tokaccel.kernels.testing import run_each

    def check(c):
        x, n, k, first, imp = inputs(c)
        ref = greedy_select_reference(x, n, k, first, imp, c["lam"])
        got = greedy_select(x, n, k, first, imp, c["lam"], backend="triton")
        if not torch.equal(ref, got):
            raise AssertionError(f"picks differ:\n{ref}\n{got}")

    return {"interpret_enabled": interpret_enabled(), "cases": run_each(cases, check)}


if __name__ == "__main__":
    from tokaccel.kernels.testing import worker_main

    worker_main(run_cases)
