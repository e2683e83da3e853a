"""Runs fc_scores Triton-vs-reference cases; meant for a process with TRITON_INTERPRET=1 (see
interp_worker.py for why).

Usage: python fc_scores_interp_worker.py CASES.json RESULTS.json (test_fc_scores_kernels.py drives it).
"""
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def inputs(c):
    """q [B, G * Hk, D] fp32, keys_dom [B, Hk, N, d] (a slice of a longer cache when "strided"),
    dims [Hk, d] long (distinct random dims per head)."""
    import torch

    from tokaccel.kernels.testing import randn

    dtype = getattr(torch, DTYPES[c["dtype"]])
    B, Hk, N, D, d = c["B"], c["Hk"], c["N"], c["D"], c["d"]
    room = 7 if c.get("strided") else 0
    keys_dom = randn((B, Hk, N + room, d), dtype, seed=c.get("seed", 0))[:, :, :N]
    q = randn((B, c["G"] * Hk, D), torch.float32, seed=c.get("seed", 0) + 1)
    g = torch.Generator().manual_seed(3)
    dims = torch.stack([torch.randperm(D, generator=g)[:d] for _ in range(Hk)])
    return q, keys_dom, dims


def run_cases(cases):
    from tokaccel.kernels.ops import interpret_enabled
    from tokaccel.kernels.fc_scores import fc_scores, fc_scores_reference
    from tokaccel.kernels.testing import assert_close, run_each

    def check(c):
        q, keys_dom, dims = inputs(c)
        got = fc_scores(q, keys_dom, dims, 0.3, backend="triton")
        want = fc_scores_reference(q.to(keys_dom.dtype), keys_dom, dims, 0.3)
        assert_close(got, want, dtype=keys_dom.dtype, name=c["id"])

    return {"interpret_enabled": interpret_enabled(), "cases": run_each(cases, check)}


if __name__ == "__main__":
    from tokaccel.kernels.testing import worker_main

    worker_main(run_cases)
