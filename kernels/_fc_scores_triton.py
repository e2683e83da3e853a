"""Triton kernel for :func:`tokaccel.kernels.fc_scores` (imported only when triton is).

One program per (key tile of BLOCK_N tokens, KV head, batch): it loads the KV head's dominant
dim ids once, gathers the G query rows at those dims, and scores the tile of the compact key
copy ([N, d] contiguous per head: each key row is d values, not D) with a broadcast multiply
and fp32 sum, in BLOCK_D slices of d. Block sizes are heuristics, not tuned on a GPU.
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from .dispatch import AotConfig, register_kernel

_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
BLOCK_N = 64
PRODUCT_BUDGET = 4096  # values of the [BLOCK_G, BLOCK_N, BLOCK_D] fp32 temporary


def _block_d(block_g: int, d: int) -> int:
    return min(triton.next_power_of_2(d), max(16, PRODUCT_BUDGET // (block_g * BLOCK_N)))


def _aot() -> List[AotConfig]:
    configs = []
    for dtype, G, d in ((torch.float16, 3, 16), (torch.bfloat16, 4, 64), (torch.float32, 8, 32),
                        (torch.float16, 1, 8)):
        ty = _TL[dtype]
        signature = {"Q": f"*{ty}", "K": f"*{ty}", "Dims": "*i64", "Out": "*fp32", "scale": "fp32", "N": "i32",
                     "R": "i32", "HEAD_DIM": "i32", "stride_kb": "i32", "stride_kh": "i32", "stride_kn": "i32",
                     "G": "constexpr", "DOM": "constexpr", "BLOCK_G": "constexpr", "BLOCK_N": "constexpr",
                     "BLOCK_D": "constexpr"}
        block_g = triton.next_power_of_2(G)
        constexprs = {"G": G, "DOM": d, "BLOCK_G": block_g, "BLOCK_N": BLOCK_N, "BLOCK_D": _block_d(block_g, d)}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(signature)
                 if signature[n] != "constexpr" and n not in ("scale", "N", "R", "HEAD_DIM")}
        configs.append(AotConfig(name=f"{ty}_G{G}_d{d}", signature=signature, constexprs=constexprs, attrs=attrs,
                                 options={"num_warps": 4, "num_stages": 1}))
    return configs


@register_kernel(_aot, name="fc_scores")
def _fc_scores_kernel(Q, K, Dims, Out, scale, N, R, HEAD_DIM, stride_kb, stride_kh, stride_kn,
                      G: tl.constexpr, DOM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    # Q [B, R, HEAD_DIM]; K [B, Hk, N, DOM] (last dim contiguous); Dims [Hk, DOM] i64; Out [B, R, N] fp32.
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    mask_n = offs_n < N
    rows = (hk * G + offs_g).to(tl.int64)
    q_base = Q + (b.to(tl.int64) * R + rows[:, None]) * HEAD_DIM
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn
    acc = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    for d0 in tl.static_range(0, DOM, BLOCK_D):
        mask_d = (d0 + offs_d) < DOM
        dim_ids = tl.load(Dims + hk.to(tl.int64) * DOM + d0 + offs_d, mask=mask_d, other=0)
        q = tl.load(q_base + dim_ids[None, :], mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        k = tl.load(k_base + d0 + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(q[:, None, :] * k[None, :, :], axis=2)
    out_ptrs = Out + (b.to(tl.int64) * R + rows[:, None]) * N + offs_n[None, :]
    tl.store(out_ptrs, acc * scale, mask=mask_g[:, None] & mask_n[None, :])


def fc_scores_triton(q, keys_dom, dims, scale=1.0):
    """Triton launcher (inputs already validated); see ``fc_scores.fc_scores``."""
    B, R, D = q.shape
    _, Hk, N, d = keys_dom.shape
    G = R // Hk
    out = torch.empty(B, R, N, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    if d == 0:
        return out.zero_()
    if keys_dom.stride(-1) != 1:
        keys_dom = keys_dom.contiguous()
    q = q.to(keys_dom.dtype).contiguous()
    block_g = triton.next_power_of_2(G)
    grid = (triton.cdiv(N, BLOCK_N), Hk, B)
    _fc_scores_kernel[grid](q, keys_dom, dims.contiguous(), out, float(scale), N, R, D,
                            keys_dom.stride(0), keys_dom.stride(1), keys_dom.stride(2),
                            G=G, DOM=d, BLOCK_G=block_g, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(block_g, d), num_warps=4)
    return out
