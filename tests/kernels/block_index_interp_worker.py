"""Runs block_summaries / block_bound_scores / block_token_scores Triton-vs-reference cases; meant for
a process with TRITON_INTERPRET=1 (see interp_worker.py for why).

Usage: python block_index_interp_worker.py CASES.json RESULTS.json (test_block_index_kernels.py drives it).
"""
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def inputs(c):
    """keys [B, Hk, N, D] (a slice of a longer cache when "strided"), valid [B, N] or None (row b's
    first pad * b tokens invalid), q [B, G * Hk, D] fp32, blocks [B, M] (the last one past N when
    "overhang")."""
    import torch

    from tokaccel.kernels.testing import randn

    dtype = getattr(torch, DTYPES[c["dtype"]])
    B, Hk, N, D, T = c["B"], c["Hk"], c["N"], c["D"], c["T"]
    room = 13 if c.get("strided") else 0
    keys = randn((B, Hk, N + room, D), dtype, seed=c.get("seed", 0))[:, :, :N]
    valid = None
    if c.get("pad") is not None:
        valid = torch.arange(N)[None] >= torch.tensor([c["pad"] * b for b in range(B)])[:, None]
    q = randn((B, c["G"] * Hk, D), torch.float32, seed=c.get("seed", 0) + 1)
    nb = -(-N // T)
    g = torch.Generator().manual_seed(2)
    M = min(c.get("M", 3), nb)
    blocks = torch.stack([torch.randperm(nb, generator=g)[:M].sort().values for _ in range(B)])
    if c.get("overhang"):
        blocks[:, -1] = nb - 1
    return keys, valid, q, blocks


def run_cases(cases):
    import torch

    from tokaccel.kernels.ops import interpret_enabled
    from tokaccel.kernels.block_index import (block_bound_scores, block_bound_scores_reference, block_summaries,
                                              block_summaries_reference, block_token_scores,
                                              block_token_scores_reference)
    from tokaccel.kernels.testing import assert_close, run_each

    def check(c):
        keys, valid, q, blocks = inputs(c)
        first = c.get("first", 0)
        ref = block_summaries_reference(keys, valid, c["T"], first)
        res = block_summaries(keys, valid, c["T"], first, backend="triton")
        assert_close(res[0], ref[0], dtype=keys.dtype, name=c["id"] + "/mean")
        for got, want, what in zip(res[1:], ref[1:], ("max", "min", "count")):
            if got.dtype != want.dtype or not torch.equal(got, want):
                raise AssertionError(f"{c['id']}/{what}: not equal to the reference")
        _, kmax, kmin, _ = ref
        assert_close(block_bound_scores(q, kmax, kmin, 0.3, backend="triton"),
                     block_bound_scores_reference(q, kmax, kmin, 0.3), dtype=keys.dtype, name=c["id"] + "/bound")
        got = block_token_scores(q, keys, blocks, c["T"], 0.3, backend="triton")
        want = block_token_scores_reference(q, keys, blocks, c["T"], 0.3)
        if not torch.equal(torch.isinf(got), torch.isinf(want)):
            raise AssertionError(f"{c['id']}/tokens: -inf columns differ")
        finite = torch.isfinite(want)
        assert_close(got[finite], want[finite], dtype=keys.dtype, name=c["id"] + "/tokens")

    return {"interpret_enabled": interpret_enabled(), "cases": run_each(cases, check)}


if __name__ == "__main__":
    from tokaccel.kernels.testing import worker_main

    worker_main(run_cases)
