"""Runs softmax_head_sum / indexed_decode_attention / indexed_prefill_attention Triton-vs-reference
cases; meant for a process with TRITON_INTERPRET=1 (see interp_worker.py for why).

Usage: python selection_interp_worker.py CASES.json RESULTS.json (test_selection_kernels.py drives it).
"""
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def rope_table(P, R):
    """fp32 cos/sin [P, R] in HF's rotate_half layout (halves duplicated)."""
    import torch

    angles = torch.arange(P, dtype=torch.float32)[:, None] * (1e4 ** (-torch.arange(0, R, 2) / R))[None]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def vote_inputs(c):
    """scores [B, R, N] with masked prefixes, one fully masked row, and weights (or None)."""
    import torch

    from tokaccel.kernels.testing import randn

    B, R, N = c["B"], c["R"], c["N"]
    scores = randn((B, R, N), seed=c.get("seed", 0), std=c.get("std", 3.0))
    if c.get("masked") and N:
        scores[:, :, : N // 3] = float("-inf")
        scores[0, 0] = float("-inf")
    weights = None
    if c.get("weights"):
        weights = torch.rand(B, R, generator=torch.Generator().manual_seed(1))
        weights[:, 0] = 0.0
    return scores, weights


def attention_inputs(c):
    """q, k, v (cache view with headroom when "strided"), idx [B, L] sorted, start, cos/sin or None."""
    import torch

    from tokaccel.kernels.testing import randn

    dtype = getattr(torch, DTYPES[c["dtype"]])
    B, H, Hk, N, D, L = c["B"], c["G"] * c["Hk"], c["Hk"], c["N"], c["D"], c["L"]
    seed = c.get("seed", 0)
    room = 29 if c.get("strided") else 0
    q = randn((B, H, D), dtype, seed=seed)
    k = randn((B, Hk, N + room, D), dtype, seed=seed + 1)[:, :, :N]
    v = randn((B, Hk, N + room, D), dtype, seed=seed + 2)[:, :, :N]
    g = torch.Generator().manual_seed(seed + 3)
    idx = torch.stack([torch.randperm(N, generator=g)[:L].sort().values for _ in range(B)])
    start = torch.tensor([min(c.get("pad", 0) * b, L) for b in range(B)], dtype=torch.long)
    cos = sin = None
    if c.get("rope"):
        cos, sin = rope_table(L + 5, c.get("rot", D))
    return q, k, v, idx, start, cos, sin


def permuted_keys(k, seed=0):
    """k [B, Hk, N, D] stored with each head's dims permuted (FASA's layout, a random permutation
    per head) and key_columns [Hk, D] (natural dim i of head h at column key_columns[h, i])."""
    import torch

    g = torch.Generator().manual_seed(seed + 9)
    Hk, D = k.shape[1], k.shape[3]
    order = torch.stack([torch.randperm(D, generator=g) for _ in range(Hk)])  # column j holds dim order[h, j]
    stored = k.gather(3, order[None, :, None, :].expand(k.shape))
    return stored, order.argsort(dim=1)


def prefill_inputs(c):
    """q [B, H, S, D] (a slice of a longer query buffer when "strided"), k, v, idx as attention_inputs,
    col_valid [B, L] (None unless "pad" / "holes" / "valid": row b's first pad * b columns invalid,
    every holes-th column of the causal tail invalid), cos/sin or None."""
    import torch

    from tokaccel.kernels.testing import randn

    c = dict(c)
    S = c.pop("S")
    _, k, v, idx, start, cos, sin = attention_inputs(c)
    dtype = getattr(torch, DTYPES[c["dtype"]])
    B, H, D, L = c["B"], c["G"] * c["Hk"], c["D"], c["L"]
    room = 7 if c.get("strided") else 0
    q = randn((B, H, S + room, D), dtype, seed=c.get("seed", 0) + 4)[:, :, room:]
    col_valid = None
    if c.get("pad") or c.get("holes") or c.get("valid"):
        col_valid = torch.arange(L)[None] >= start[:, None]
        if c.get("holes"):
            col_valid[:, L - S + 1::c["holes"]] = False
    return q, k, v, idx, col_valid, cos, sin


def run_cases(cases):
    import torch

    from tokaccel.kernels.ops import interpret_enabled
    from tokaccel.kernels._indexed_attention_triton import indexed_decode_attention_triton
    from tokaccel.kernels._soft_vote_triton import softmax_head_sum_triton
    from tokaccel.kernels.indexed_attention import (indexed_decode_attention, indexed_decode_attention_reference,
                                                    indexed_prefill_attention, indexed_prefill_attention_reference)
    from tokaccel.kernels.soft_vote import softmax_head_sum, softmax_head_sum_reference
    from tokaccel.kernels.testing import assert_close, run_each

    def check(c):
        if c["op"] == "vote":
            scores, weights = vote_inputs(c)
            ref = softmax_head_sum_reference(scores.clone(), weights)
            if c.get("splits"):
                res = softmax_head_sum_triton(scores, weights, splits=c["splits"])
            else:
                res = softmax_head_sum(scores, weights, backend="triton")
            assert_close(res, ref, dtype=torch.float32, name=c["id"])
        elif c["op"] == "prefill":
            q, k, v, idx, col_valid, cos, sin = prefill_inputs(c)
            ref = indexed_prefill_attention_reference(q, k, v, idx, col_valid, 0.125, cos, sin)
            cols = None
            if c.get("permuted"):  # the same attention from keys stored with permuted dims
                k, cols = permuted_keys(k, c.get("seed", 0))
            res = indexed_prefill_attention(q, k, v, idx, col_valid, 0.125, cos, sin, cols, backend="triton")
            B, H, S, D = q.shape
            if res.dtype != q.dtype or res.shape != (B, S, H, D):
                raise AssertionError(f"bad output {res.dtype} {tuple(res.shape)}")
            assert_close(res, ref, name=c["id"])
        else:
            args = attention_inputs(c)
            ref = indexed_decode_attention_reference(*args[:5], 0.125, *args[5:])
            cols = None
            if c.get("permuted"):  # the same attention from keys stored with permuted dims
                stored, cols = permuted_keys(args[1], c.get("seed", 0))
                args = (args[0], stored) + args[2:]
            if c.get("splits"):
                res = indexed_decode_attention_triton(*args[:5], 0.125, *args[5:], cols, splits=c["splits"])
            else:
                res = indexed_decode_attention(*args[:5], 0.125, *args[5:], cols, backend="triton")
            if res.dtype != args[0].dtype or res.shape != args[0].shape:
                raise AssertionError(f"bad output {res.dtype} {tuple(res.shape)}")
            assert_close(res, ref, name=c["id"])

    return {"interpret_enabled": interpret_enabled(), "cases": run_each(cases, check)}


if __name__ == "__main__":
    from tokaccel.kernels.testing import worker_main

    worker_main(run_cases)
