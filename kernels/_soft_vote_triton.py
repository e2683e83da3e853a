"""Triton kernels for :func:`tokaccel.kernels.softmax_head_sum` (imported only when triton is).

Pass 1 (``softmax_row_stats``): one program per (row, split of the tokens) computes the running
max and exp-sum of its part of the row (online, fp32); the few partials per row are merged in
torch. Pass 2 (``softmax_head_sum``): one program per (token tile, batch) loops over the rows in
blocks of BLOCK_R and accumulates ``exp(s - max) * weight / sum`` in fp32.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .dispatch import AotConfig, register_kernel

NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity": exp(-inf - NEG_BIG) = 0 and no inf - inf
STATS_BLOCK_N = 1024
SUM_BLOCK_N = 256
SUM_BLOCK_R = 8


def _aligned(signature, skip):
    names = list(signature)
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
            if signature[n] != "constexpr" and n not in skip}


def _stats_aot_configs() -> List[AotConfig]:
    signature = {"S": "*fp32", "M": "*fp32", "L": "*fp32", "N": "i32", "R": "i32", "SPLIT_N": "i32",
                 "NUM_SPLITS": "i32", "stride_sb": "i32", "stride_sr": "i32", "BLOCK_N": "constexpr"}
    return [AotConfig(name=f"block{STATS_BLOCK_N}", signature=signature, constexprs={"BLOCK_N": STATS_BLOCK_N},
                      attrs=_aligned(signature, ("N", "R", "SPLIT_N", "NUM_SPLITS")),
                      options={"num_warps": 4, "num_stages": 1})]


@register_kernel(_stats_aot_configs, name="softmax_row_stats")
def _stats_kernel(S, M, L, N, R, SPLIT_N, NUM_SPLITS, stride_sb, stride_sr, BLOCK_N: tl.constexpr):
    # S [B, R, N] fp32 (last dim contiguous); M, L [B * R, NUM_SPLITS] fp32 partial max / exp-sum.
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // R
    r = row % R
    base = S + b.to(tl.int64) * stride_sb + r.to(tl.int64) * stride_sr
    start = split * SPLIT_N
    stop = tl.minimum(start + SPLIT_N, N)
    offs = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_N], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        x = tl.load(base + n0 + offs, mask=(n0 + offs) < stop, other=float("-inf"))
        m_new = tl.maximum(m_i, x)
        l_i = l_i * tl.exp(m_i - m_new) + tl.exp(x - m_new)
        m_i = m_new
    m = tl.max(m_i, axis=0)
    l = tl.sum(l_i * tl.exp(m_i - m), axis=0)
    tl.store(M + row.to(tl.int64) * NUM_SPLITS + split, m)
    tl.store(L + row.to(tl.int64) * NUM_SPLITS + split, l)


def _sum_aot_configs() -> List[AotConfig]:
    signature = {"S": "*fp32", "M": "*fp32", "C": "*fp32", "Out": "*fp32", "N": "i32", "R": "i32",
                 "stride_sb": "i32", "stride_sr": "i32", "stride_ob": "i32",
                 "BLOCK_N": "constexpr", "BLOCK_R": "constexpr"}
    return [AotConfig(name=f"n{SUM_BLOCK_N}_r{SUM_BLOCK_R}", signature=signature,
                      constexprs={"BLOCK_N": SUM_BLOCK_N, "BLOCK_R": SUM_BLOCK_R},
                      attrs=_aligned(signature, ("N", "R")), options={"num_warps": 4, "num_stages": 2})]


@register_kernel(_sum_aot_configs, name="softmax_head_sum")
def _sum_kernel(S, M, C, Out, N, R, stride_sb, stride_sr, stride_ob, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    # S [B, R, N] fp32; M, C [B, R] fp32 (row max, weight / exp-sum); Out [B, N] fp32.
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + offs_r
        mask_r = rows < R
        m = tl.load(M + b * R + rows, mask=mask_r, other=0.0)
        c = tl.load(C + b * R + rows, mask=mask_r, other=0.0)
        ptrs = S + b.to(tl.int64) * stride_sb + rows[:, None].to(tl.int64) * stride_sr + offs_n[None, :]
        x = tl.load(ptrs, mask=mask_r[:, None] & mask_n[None, :], other=float("-inf"))
        acc += tl.sum(tl.exp(x - m[:, None]) * c[:, None], axis=0)
    tl.store(Out + b.to(tl.int64) * stride_ob + offs_n, acc, mask=mask_n)


def softmax_head_sum_triton(scores: torch.Tensor, weights: Optional[torch.Tensor] = None, *,
                            overwrite: bool = False, splits: Optional[int] = None) -> torch.Tensor:
    """Triton launcher (inputs already validated): scores [B, R, N] fp32 -> [B, N] fp32.

    ``overwrite`` is accepted for signature parity and ignored (scores are only read).
    ``splits`` overrides the number of token splits of pass 1 (tests)."""
    from .soft_vote import head_row_stats

    B, R, N = scores.shape
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    out = torch.empty((B, N), dtype=torch.float32, device=scores.device)
    if out.numel() == 0:
        return out
    if R == 0:
        return out.zero_()
    if splits is None:  # enough programs to fill a GPU, each over >= 4 tiles
        splits = max(1, min(triton.cdiv(N, 4 * STATS_BLOCK_N), triton.cdiv(512, B * R)))
    split_n = triton.cdiv(triton.cdiv(N, splits), STATS_BLOCK_N) * STATS_BLOCK_N
    splits = triton.cdiv(N, split_n)
    m_part = torch.empty((B * R, splits), dtype=torch.float32, device=scores.device)
    l_part = torch.empty_like(m_part)
    _stats_kernel[(B * R, splits)](scores, m_part, l_part, N, R, split_n, splits, scores.stride(0),
                                   scores.stride(1), BLOCK_N=STATS_BLOCK_N, num_warps=4)
    m = m_part.amax(-1, keepdim=True)
    l_sum = (l_part * torch.exp(m_part - m)).sum(-1, keepdim=True)
    m, coef = head_row_stats(m.view(B, R, 1), l_sum.view(B, R, 1), weights)
    m, coef = m.view(B, R).contiguous(), coef.view(B, R).contiguous()
    _sum_kernel[(triton.cdiv(N, SUM_BLOCK_N), B)](scores, m, coef, out, N, R, scores.stride(0), scores.stride(1),
                                                  out.stride(0), BLOCK_N=SUM_BLOCK_N, BLOCK_R=SUM_BLOCK_R,
                                                  num_warps=4)
    return out
