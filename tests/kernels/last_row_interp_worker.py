"""Runs last_row_attention Triton-vs-reference cases; meant for a process with TRITON_INTERPRET=1
(see interp_worker.py for why).

Usage: python last_row_interp_worker.py CASES.json RESULTS.json (test_last_row_kernels.py drives it).
"""


def inputs(c):
    """q [B, H, D], k [B, Hk, N, D] (a strided slice when "strided"), valid [B, N] or None."""
    import torch

    g = torch.Generator().manual_seed(c.get("seed", 0))
    B, H, Hk, N, D = c["B"], c["H"], c["Hk"], c["N"], c["D"]
    dtype = getattr(torch, c["dtype"])
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(B, Hk, N + (5 if c.get("strided") else 0), D, generator=g).to(dtype)[:, :, :N]
    valid = None
    if c.get("valid"):
        valid = torch.rand(B, N, generator=g) > 0.3
        valid[-1, : N // 2] = False
    return q, k, valid


def run_cases(cases):
    from tokaccel.kernels.ops import interpret_enabled
    from tokaccel.kernels.last_row import last_row_attention, last_row_attention_reference
    from tokaccel.kernels.testing import assert_close, run_each

    def check(c):
        q, k, valid = inputs(c)
        scale = c["D"] ** -0.5
        ref = last_row_attention_reference(q, k, scale, valid)
        got = last_row_attention(q, k, scale, valid, backend="triton")
        assert_close(got, ref, name=c["id"])  # both fp32 from identical inputs: fp32 tolerances

    return {"interpret_enabled": interpret_enabled(), "cases": run_each(cases, check)}


if __name__ == "__main__":
    from tokaccel.kernels.testing import worker_main

    worker_main(run_cases)
