"""Runs paged_indexed_attention / paged_key_scores Triton-vs-reference cases; meant for a process with
TRITON_INTERPRET=1 (see interp_worker.py for why).

Usage: python paged_interp_worker.py CASES.json RESULTS.json (test_paged_attention_kernels.py drives it).
"""
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def paged_inputs(c):
    """A random vLLM CUDA cache and the sequences in it, from case dict c (B, G, Hk, D, bs, lengths,
    dtype, optional L, holes, seed):

    q [B, H, D]; key_cache, value_cache [NB, bs, Hk, D]: ``kv.transpose(1, 2).split(D, -1)`` of one
    kv [NB, Hk, bs, 2D] (strided views, as vLLM's Triton backend splits it); block_table [B, M] int32:
    each sequence's blocks drawn from a shuffled permutation of the NB blocks (3 spare), columns past
    its last block stale (out of range, so a read would fail); lengths [B] int64; idx [B, L] int64
    token positions in random order (distinct while the sequence has L tokens) and valid [B, L] bool:
    every ``holes``-th entry invalid with a junk position, row 0 (when B > 1) entirely invalid if
    c["dead_row"]."""
    import torch

    from tokaccel.kernels.testing import randn

    dtype = getattr(torch, DTYPES[c["dtype"]])
    B, Hk, D, bs = c["B"], c["Hk"], c["D"], c["bs"]
    H = c["G"] * Hk
    lengths = torch.tensor(c["lengths"], dtype=torch.long)
    seed = c.get("seed", 0)
    g = torch.Generator().manual_seed(seed + 7)
    per_seq = [-(-int(n) // bs) for n in lengths]
    M = max(per_seq) + c.get("extra_cols", 1)
    NB = sum(per_seq) + 3
    perm = torch.randperm(NB, generator=g)
    table = torch.full((B, M), NB + 1000, dtype=torch.int32)  # stale entries: out of range
    used = 0
    for b, nb in enumerate(per_seq):
        table[b, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    kv = randn((NB, Hk, bs, 2 * D), dtype, seed=seed + 1)
    key_cache, value_cache = kv.transpose(1, 2).split(D, dim=-1)
    q = randn((B, H, D), dtype, seed=seed)
    L = c.get("L", 0)
    idx = torch.zeros(B, L, dtype=torch.long)
    valid = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        n = int(lengths[b])
        if n:
            picks = torch.randperm(n, generator=g)[:L]
            if picks.numel() < L:  # short sequence: repeat positions (still a valid index set)
                picks = picks.repeat(-(-L // picks.numel()))[:L]
            idx[b] = picks
        else:
            valid[b] = False
    if c.get("holes"):
        valid[:, ::c["holes"]] = False
        idx[:, ::c["holes"]] = 10 ** 9  # junk: must never be read
    if c.get("dead_row") and B > 1:
        valid[0] = False
    return q, key_cache, value_cache, table, lengths, idx, valid


def run_cases(cases):
    import torch

    from tokaccel.kernels.ops import interpret_enabled
    from tokaccel.kernels.paged_attention import (paged_indexed_attention, paged_indexed_attention_reference,
                                                  paged_key_scores, paged_key_scores_reference)
    from tokaccel.kernels.testing import assert_close, run_each

    def check(c):
        q, key_cache, value_cache, table, lengths, idx, valid = paged_inputs(c)
        if c["op"] == "attn":
            scale = c["D"] ** -0.5
            ref = paged_indexed_attention_reference(q, key_cache, value_cache, table, idx, valid, scale)
            res = paged_indexed_attention(q, key_cache, value_cache, table, idx, valid, scale, backend="triton")
            if res.dtype != q.dtype or res.shape != q.shape:
                raise AssertionError(f"bad output {res.dtype} {tuple(res.shape)}")
            assert_close(res, ref, name=c["id"])
        else:
            lens = lengths.to(torch.int32) if c.get("int32_lengths") else lengths
            ref = paged_key_scores_reference(q, key_cache, table, lens)
            res = paged_key_scores(q, key_cache, table, lens, backend="triton")
            if res.dtype != torch.float32 or res.shape != ref.shape:
                raise AssertionError(f"bad output {res.dtype} {tuple(res.shape)}")
            # both accumulate exactly representable products in fp32: fp32 tolerance
            assert_close(res, ref, dtype=torch.float32, name=c["id"])
            if not torch.equal(torch.isinf(res), torch.isinf(ref)):
                raise AssertionError("-inf positions differ")

    return {"interpret_enabled": interpret_enabled(), "cases": run_each(cases, check)}


if __name__ == "__main__":
    from tokaccel.kernels.testing import worker_main

    worker_main(run_cases)
