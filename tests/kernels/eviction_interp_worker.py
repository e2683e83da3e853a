"""Runs decode_attention_probs / attention_column_sums Triton-vs-reference cases; meant for a process
with TRITON_INTERPRET=1 (see interp_worker.py for why).

Usage: python eviction_interp_worker.py CASES.json RESULTS.json (test_eviction_kernels.py drives it).
"""

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def masks(c, Hk, N, S):
    """key_valid [B, Hk, N] and query_valid [B, S] (None unless asked for).

    "mask": random holes, but key 0 stays valid, so every (b, hk) and every query row has an allowed
    key. "leftpad": batch row 1 starts with `leftpad` < N padding keys (the next one is valid); queries
    at those positions are padding (query_valid False) and, causal, have no allowed key at all."""
    import torch

    B = c["B"]
    g = torch.Generator().manual_seed(c.get("seed", 0) + 7)
    key_valid = query_valid = None
    if c.get("mask"):
        key_valid = torch.rand(B, Hk, N, generator=g) < 0.7
        key_valid[:, :, 0] = True
    pad = c.get("leftpad", 0)
    if pad:
        key_valid = torch.ones(B, Hk, N, dtype=torch.bool) if key_valid is None else key_valid
        key_valid[1, :, :pad] = False
        key_valid[1, :, pad] = True
        query_valid = torch.ones(B, S, dtype=torch.bool)
        query_valid[1, :max(0, pad - (N - S))] = False
    return key_valid, query_valid


def decode_inputs(c):
    """q [B, H, D], k, v [B, Hk, N, D] (strided when "bnhd"), scale, key_valid."""
    import torch

    from tokaccel.kernels.testing import randn

    dtype = getattr(torch, DTYPES[c["dtype"]])
    B, G, Hk, N, D, seed = c["B"], c["G"], c["Hk"], c["N"], c["D"], c.get("seed", 0)
    q = randn((B, Hk * G, D), dtype, seed=seed)
    if c.get("layout") == "bnhd":  # a [B, N, Hk, D] cache seen as [B, Hk, N, D]
        k = randn((B, N, Hk, D), dtype, seed=seed + 1).transpose(1, 2)
        v = randn((B, N, Hk, D), dtype, seed=seed + 2).transpose(1, 2)
    else:
        k = randn((B, Hk, N, D), dtype, seed=seed + 1)
        v = randn((B, Hk, N, D), dtype, seed=seed + 2)
    key_valid, _ = masks(c, Hk, N, 1)
    return q, k, v, c.get("scale", D ** -0.5), key_valid


def colsum_inputs(c):
    """q [B, H, S, D], k [B, Hk, N, D], scale, and the keyword arguments of attention_column_sums
    (lse is filled in by the caller when c["lse"])."""
    import torch

    from tokaccel.kernels.testing import randn

    dtype = getattr(torch, DTYPES[c["dtype"]])
    B, G, Hk, N, S, D, seed = c["B"], c["G"], c["Hk"], c["N"], c["S"], c["D"], c.get("seed", 0)
    q = randn((B, Hk * G, S, D), dtype, seed=seed)
    k = randn((B, Hk, N, D), dtype, seed=seed + 1)
    key_valid, query_valid = masks(c, Hk, N, S)
    kwargs = {"causal": c.get("causal", True), "key_valid": key_valid, "query_valid": query_valid,
              "tile": c.get("tile", 256)}
    if c.get("weight"):
        kwargs["query_weight"] = 0.9 ** torch.arange(S - 1, -1, -1, dtype=torch.float32).expand(B, S).contiguous()
    return q, k, c.get("scale", D ** -0.5), kwargs


def run_cases(cases):
    import torch

    from tokaccel.kernels.ops import interpret_enabled
    from tokaccel.kernels._eviction_triton import decode_attention_probs_triton
    from tokaccel.kernels.eviction import (attention_column_sums, attention_column_sums_reference,
                                           decode_attention_probs, decode_attention_probs_reference)
    from tokaccel.kernels.testing import assert_close, run_each

    def check(c):
        if c["op"] == "decode":
            q, k, v, scale, key_valid = decode_inputs(c)
            ref_out, ref_probs = decode_attention_probs_reference(q, k, v, scale, key_valid)
            if c.get("splits"):
                out, probs = decode_attention_probs_triton(q, k, v, scale, key_valid, splits=c["splits"])
            else:
                out, probs = decode_attention_probs(q, k, v, scale, key_valid, backend="triton")
            # p is rounded to v's dtype before p @ v (tensor cores): the output compares at q's tolerance
            assert_close(out, ref_out, name=f"{c['id']} out")
            assert_close(probs, ref_probs, dtype=torch.float32, name=f"{c['id']} probs")
            if out.dtype != q.dtype or probs.dtype != torch.float32:
                raise AssertionError(f"bad dtypes {out.dtype} {probs.dtype}")
        else:
            q, k, scale, kwargs = colsum_inputs(c)
            if c.get("lse"):  # a given lse, with the rows of padding queries at -inf
                kwargs["lse"] = row_lse(q, k, scale, kwargs)
            ref = attention_column_sums_reference(q, k, scale, **kwargs)
            res = attention_column_sums(q, k, scale, **kwargs, backend="triton")
            # both sides take exact products of the inputs, accumulated in fp32
            assert_close(res, ref, dtype=torch.float32, name=c["id"])
            if not torch.isfinite(res).all():
                raise AssertionError("non-finite column sums")

    return {"interpret_enabled": interpret_enabled(), "cases": run_each(cases, check)}


def row_lse(q, k, scale, kwargs):
    """Row log-sum-exp [B, H, S] fp32 over the allowed keys (fp64 math), -inf for empty rows."""
    import torch

    B, H, S, _ = q.shape
    Hk, N = k.shape[1:3]
    s = torch.einsum("bhsd,bhnd->bhsn", q.double(), k.double().repeat_interleave(H // Hk, 1)) * scale
    allowed = torch.ones(S, N, dtype=torch.bool)
    if kwargs.get("causal", True):
        allowed = allowed.tril(N - S)
    if kwargs.get("key_valid") is not None:
        allowed = allowed & kwargs["key_valid"].repeat_interleave(H // Hk, 1)[:, :, None, :]
    return s.masked_fill(~allowed, float("-inf")).logsumexp(-1).float()


if __name__ == "__main__":
    from tokaccel.kernels.testing import worker_main

    worker_main(run_cases)
