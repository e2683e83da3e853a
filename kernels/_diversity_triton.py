"""Triton kernel for :func:`tokaccel.kernels.diversity.greedy_select` (imported only when triton is).

One program per set (image). Each pick streams the set's features once: per token tile, the
cosine to the last pick (fp32 accumulation over D tiles), the running max ``m`` and the "picked"
flags are updated in a scratch row, and the tile's best objective is merged into the step's
argmax (lowest index on ties, like ``torch.argmax``). The scratch rows are read and written by
the same threads in every step, and a barrier separates steps.
"""
from __future__ import annotations

from typing import List

import torch
import triton.language as tl

from .dispatch import AotConfig, register_kernel

BLOCK_N = 64
BLOCK_D = 64


def _aot_configs() -> List[AotConfig]:
    configs = []
    for dtype, has_imp in (("fp32", False), ("fp16", False), ("bf16", True)):
        signature = {"X": f"*{dtype}", "Nv": "*i64", "Kv": "*i64", "First": "*i64", "Imp": "*fp32",
                     "Run": "*fp32", "Blocked": "*i8", "Out": "*i64", "N": "i32", "D": "i32", "K": "i32",
                     "stride_xs": "i32", "stride_xn": "i32", "lam": "fp32", "HAS_IMP": "constexpr",
                     "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
        configs.append(AotConfig(
            name=f"{dtype}_imp{int(has_imp)}", signature=signature,
            constexprs={"HAS_IMP": has_imp, "BLOCK_N": BLOCK_N, "BLOCK_D": BLOCK_D},
            attrs={(0,): [["tt.divisibility", 16]], (5,): [["tt.divisibility", 16]]},
            options={"num_warps": 4, "num_stages": 1}))
    return configs


@register_kernel(_aot_configs, name="greedy_select")
def _greedy_kernel(X, Nv, Kv, First, Imp, Run, Blocked, Out, N, D, K, stride_xs, stride_xn, lam,
                   HAS_IMP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # X [S, N, D] (last dim contiguous); Run [S, N] fp32 (-inf); Blocked [S, N] int8 (0); Out [S, K] (-1).
    s = tl.program_id(0)
    n_s = tl.load(Nv + s).to(tl.int32)
    k_s = tl.load(Kv + s).to(tl.int32)
    cur = tl.load(First + s).to(tl.int32)
    xs = X + s.to(tl.int64) * stride_xs
    run_row = Run + s.to(tl.int64) * N
    blk_row = Blocked + s.to(tl.int64) * N
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D)
    for t in range(0, k_s):
        tl.store(Out + s.to(tl.int64) * K + t, cur.to(tl.int64))
        best_v = float("-inf")
        best_i = N
        for n0 in range(0, n_s, BLOCK_N):
            offs_n = n0 + offs_n0
            valid = offs_n < n_s
            acc = tl.zeros([BLOCK_N], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_d0
                dmask = offs_d < D
                c = tl.load(xs + cur.to(tl.int64) * stride_xn + offs_d, mask=dmask, other=0.0).to(tl.float32)
                xt = tl.load(xs + offs_n[:, None].to(tl.int64) * stride_xn + offs_d[None, :],
                             mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(xt * c[None, :], axis=1)
            r = tl.load(run_row + offs_n, mask=valid, other=float("-inf"))
            r = tl.maximum(r, acc)
            tl.store(run_row + offs_n, r, mask=valid)
            blk = tl.load(blk_row + offs_n, mask=valid, other=1)
            blk = tl.where(offs_n == cur, 1, blk).to(tl.int8)
            tl.store(blk_row + offs_n, blk, mask=valid)
            obj = -(1.0 - lam) * r
            if HAS_IMP:
                obj += lam * tl.load(Imp + s.to(tl.int64) * N + offs_n, mask=valid, other=0.0)
            obj = tl.where(valid & (blk == 0), obj, float("-inf"))
            m = tl.max(obj, axis=0)
            mi = tl.min(tl.where(obj == m, offs_n, N), axis=0)
            better = (m > best_v) | ((m == best_v) & (mi < best_i))
            best_v = tl.where(better, m, best_v)
            best_i = tl.where(better, mi, best_i)
        cur = best_i
        tl.debug_barrier()


def greedy_select_triton(x, n, k, first, importance=None, lam: float = 0.0) -> torch.Tensor:
    S, N, D = x.shape
    K = int(k.max()) if S else 0
    out = torch.full((S, K), -1, dtype=torch.long, device=x.device)
    if K == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    run = torch.full((S, N), float("-inf"), dtype=torch.float32, device=x.device)
    blocked = torch.zeros((S, N), dtype=torch.int8, device=x.device)
    imp = importance.contiguous() if importance is not None else run  # unread when HAS_IMP is False
    _greedy_kernel[(S,)](x, n.contiguous(), k.contiguous(), first.contiguous(), imp, run, blocked, out, N, D, K,
                         x.stride(0), x.stride(1), float(lam), HAS_IMP=importance is not None,
                         BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=4)
    return out
