"""Triton kernels for :mod:`tokaccel.kernels.block_index` (imported only when triton is).

* ``block_summaries``: one program per (block, KV head x head-dim slice, batch); it walks the
  block's T tokens in tiles of BLOCK_T and reduces sum / max / min over the valid ones.
* ``block_bound_scores``: one program per (tile of BLOCK_NB blocks, KV head, batch); the G rows
  of the KV head share one load of each block's max / min (broadcast multiply, fp32).
* ``block_token_scores``: one program per (chosen block, KV head, batch); the G rows share one
  load of each tile of the block's keys, read in place through the block id (no gather copy).
Block sizes are heuristics, not tuned on a GPU.
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from .dispatch import AotConfig, register_kernel

_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
SUM_BLOCK_T = 32
SUM_BLOCK_D = 64
BOUND_BLOCK_NB = 32
TOKEN_BLOCK_T = 32


def _aligned(signature, skip):
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(signature)
            if signature[n] != "constexpr" and n not in skip}


def _block_d(block_g: int, block_n: int, d: int, budget: int) -> int:
    """Head-dim tile keeping the [BLOCK_G, BLOCK_N, BLOCK_D] fp32 temporary within `budget` values."""
    return min(triton.next_power_of_2(d), max(16, budget // (block_g * block_n)))


# ------------------------------------------------------------------------------ summaries


def _summaries_aot() -> List[AotConfig]:
    configs = []
    for dtype, has_valid in ((torch.float16, True), (torch.bfloat16, False), (torch.float32, True)):
        ty = _TL[dtype]
        signature = {"K": f"*{ty}", "Valid": "*u8", "Mean": "*fp32", "Max": f"*{ty}", "Min": f"*{ty}",
                     "Count": "*i32", "N": "i32", "T": "i32", "first_block": "i32", "nb": "i32", "Hk": "i32",
                     "D": "i32", "stride_kb": "i32", "stride_kh": "i32", "stride_kn": "i32",
                     "HAS_VALID": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}
        configs.append(AotConfig(name=f"{ty}_valid{int(has_valid)}", signature=signature,
                                 constexprs={"HAS_VALID": has_valid, "BLOCK_T": SUM_BLOCK_T, "BLOCK_D": SUM_BLOCK_D},
                                 attrs=_aligned(signature, ("N", "T", "first_block", "nb", "Hk", "D")),
                                 options={"num_warps": 4, "num_stages": 1}))
    return configs


@register_kernel(_summaries_aot, name="block_summaries")
def _summaries_kernel(K, Valid, Mean, Max, Min, Count, N, T, first_block, nb, Hk, D,
                      stride_kb, stride_kh, stride_kn,
                      HAS_VALID: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # K [B, Hk, N, D]; Valid [B, N] u8; Mean [B, Hk, nb, D] fp32; Max/Min [B, Hk, nb, D]; Count [B, nb] i32.
    j = tl.program_id(0)  # output block index; the cache block is first_block + j
    pid_hd = tl.program_id(1)
    b = tl.program_id(2)
    n_d = tl.cdiv(D, BLOCK_D)
    hk = pid_hd // n_d
    dc = pid_hd % n_d
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    t_start = (first_block + j) * T
    t_stop = tl.minimum(t_start + T, N)
    base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    acc = tl.zeros([BLOCK_D], tl.float32)
    hi = tl.full([BLOCK_D], float("-inf"), tl.float32)
    lo = tl.full([BLOCK_D], float("inf"), tl.float32)
    cnt = tl.zeros([BLOCK_T], tl.int32)
    for t0 in range(t_start, t_stop, BLOCK_T):
        rows = t0 + offs_t
        ok = rows < t_stop
        if HAS_VALID:
            ok = ok & (tl.load(Valid + b.to(tl.int64) * N + rows, mask=ok, other=0) != 0)
        x = tl.load(base + rows[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                    mask=ok[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x, axis=0)
        hi = tl.maximum(hi, tl.max(tl.where(ok[:, None], x, float("-inf")), axis=0))
        lo = tl.minimum(lo, tl.min(tl.where(ok[:, None], x, float("inf")), axis=0))
        cnt += ok.to(tl.int32)
    count = tl.sum(cnt, axis=0)
    empty = count == 0
    mean = acc / tl.maximum(count, 1).to(tl.float32)
    hi = tl.where(empty, 0.0, hi)
    lo = tl.where(empty, 0.0, lo)
    out = ((b.to(tl.int64) * Hk + hk) * nb + j) * D + offs_d
    tl.store(Mean + out, mean, mask=mask_d)
    tl.store(Max + out, hi.to(Max.dtype.element_ty), mask=mask_d)
    tl.store(Min + out, lo.to(Min.dtype.element_ty), mask=mask_d)
    if (hk == 0) & (dc == 0):
        tl.store(Count + b.to(tl.int64) * nb + j, count)


def block_summaries_triton(keys, valid, block, first_block=0):
    """Triton launcher (inputs already validated); see ``block_index.block_summaries``."""
    B, Hk, N, D = keys.shape
    nb = max(-(-N // block) - first_block, 0)
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    mean = torch.empty(B, Hk, nb, D, dtype=torch.float32, device=keys.device)
    kmax = torch.empty(B, Hk, nb, D, dtype=keys.dtype, device=keys.device)
    kmin = torch.empty_like(kmax)
    count = torch.empty(B, nb, dtype=torch.int32, device=keys.device)
    if nb == 0 or B == 0 or Hk == 0:
        return mean, kmax, kmin, count.zero_()
    flags = valid.contiguous().view(torch.uint8) if valid is not None else count  # dummy pointer when unused
    grid = (nb, Hk * triton.cdiv(D, SUM_BLOCK_D), B)
    _summaries_kernel[grid](keys, flags, mean, kmax, kmin, count, N, block, first_block, nb, Hk, D,
                            keys.stride(0), keys.stride(1), keys.stride(2),
                            HAS_VALID=valid is not None, BLOCK_T=SUM_BLOCK_T, BLOCK_D=SUM_BLOCK_D, num_warps=4)
    return mean, kmax, kmin, count


# ------------------------------------------------------------------------------ bound scores


def _bound_aot() -> List[AotConfig]:
    configs = []
    for dtype, G, D in ((torch.float16, 4, 128), (torch.bfloat16, 8, 128), (torch.float16, 1, 256),
                        (torch.float32, 3, 64)):
        ty, block_g = _TL[dtype], triton.next_power_of_2(G)
        signature = {"Q": "*fp32", "Max": f"*{ty}", "Min": f"*{ty}", "Out": "*fp32", "scale": "fp32", "nb": "i32",
                     "R": "i32", "Hk": "i32", "G": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_G": "constexpr",
                     "BLOCK_NB": "constexpr", "BLOCK_D": "constexpr"}
        constexprs = {"G": G, "HEAD_DIM": D, "BLOCK_G": block_g, "BLOCK_NB": BOUND_BLOCK_NB,
                      "BLOCK_D": _block_d(block_g, BOUND_BLOCK_NB, D, 2048)}
        configs.append(AotConfig(name=f"{ty}_G{G}_D{D}", signature=signature, constexprs=constexprs,
                                 attrs=_aligned(signature, ("scale", "nb", "R", "Hk")),
                                 options={"num_warps": 4, "num_stages": 1}))
    return configs


@register_kernel(_bound_aot, name="block_bound_scores")
def _bound_kernel(Q, Max, Min, Out, scale, nb, R, Hk, G: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_D: tl.constexpr):
    # Q [B, R, D] fp32; Max/Min [B, Hk, nb, D] contiguous; Out [B, R, nb] fp32.
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = pid * BLOCK_NB + tl.arange(0, BLOCK_NB)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    mask_n = offs_n < nb
    rows = (hk * G + offs_g).to(tl.int64)
    q_ptrs = Q + (b.to(tl.int64) * R + rows[:, None]) * HEAD_DIM + offs_d[None, :]
    m_off = ((b.to(tl.int64) * Hk + hk) * nb + offs_n[:, None].to(tl.int64)) * HEAD_DIM + offs_d[None, :]
    acc = tl.zeros([BLOCK_G, BLOCK_NB], tl.float32)
    for d0 in tl.static_range(0, HEAD_DIM, BLOCK_D):
        mask_d = (d0 + offs_d) < HEAD_DIM
        q = tl.load(q_ptrs + d0, mask=mask_g[:, None] & mask_d[None, :], other=0.0)
        hi = tl.load(Max + m_off + d0, mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        lo = tl.load(Min + m_off + d0, mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        qq = q[:, None, :]
        acc += tl.sum(tl.maximum(qq * hi[None, :, :], qq * lo[None, :, :]), axis=2)
    out_ptrs = Out + (b.to(tl.int64) * R + rows[:, None]) * nb + offs_n[None, :]
    tl.store(out_ptrs, acc * scale, mask=mask_g[:, None] & mask_n[None, :])


def block_bound_scores_triton(q, kmax, kmin, scale=1.0):
    """Triton launcher (inputs already validated); see ``block_index.block_bound_scores``."""
    B, R, D = q.shape
    _, Hk, nb, _ = kmax.shape
    G = R // Hk
    out = torch.empty(B, R, nb, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    q = q.float().contiguous()
    kmax, kmin = kmax.contiguous(), kmin.contiguous()
    block_g = triton.next_power_of_2(G)
    grid = (triton.cdiv(nb, BOUND_BLOCK_NB), Hk, B)
    _bound_kernel[grid](q, kmax, kmin, out, float(scale), nb, R, Hk, G=G, HEAD_DIM=D, BLOCK_G=block_g,
                        BLOCK_NB=BOUND_BLOCK_NB, BLOCK_D=_block_d(block_g, BOUND_BLOCK_NB, D, 2048), num_warps=4)
    return out


# ------------------------------------------------------------------------------ token scores


def _token_aot() -> List[AotConfig]:
    configs = []
    for dtype, G, D in ((torch.float16, 4, 128), (torch.bfloat16, 8, 128), (torch.float16, 1, 256),
                        (torch.float32, 3, 64)):
        ty, block_g = _TL[dtype], triton.next_power_of_2(G)
        signature = {"Q": f"*{ty}", "K": f"*{ty}", "Blocks": "*i64", "Out": "*fp32", "scale": "fp32", "N": "i32",
                     "T": "i32", "M": "i32", "R": "i32", "stride_kb": "i32", "stride_kh": "i32", "stride_kn": "i32",
                     "G": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_G": "constexpr", "BLOCK_T": "constexpr",
                     "BLOCK_D": "constexpr"}
        constexprs = {"G": G, "HEAD_DIM": D, "BLOCK_G": block_g, "BLOCK_T": TOKEN_BLOCK_T,
                      "BLOCK_D": _block_d(block_g, TOKEN_BLOCK_T, D, 4096)}
        configs.append(AotConfig(name=f"{ty}_G{G}_D{D}", signature=signature, constexprs=constexprs,
                                 attrs=_aligned(signature, ("scale", "N", "T", "M", "R")),
                                 options={"num_warps": 4, "num_stages": 1}))
    return configs


@register_kernel(_token_aot, name="block_token_scores")
def _token_kernel(Q, K, Blocks, Out, scale, N, T, M, R, stride_kb, stride_kh, stride_kn,
                  G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    # Q [B, R, D]; K [B, Hk, N, D] (last dim contiguous); Blocks [B, M] i64; Out [B, R, M * T] fp32.
    j = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    blk = tl.load(Blocks + b.to(tl.int64) * M + j)
    offs_g = tl.arange(0, BLOCK_G)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    rows = (hk * G + offs_g).to(tl.int64)
    q_ptrs = Q + (b.to(tl.int64) * R + rows[:, None]) * HEAD_DIM + offs_d[None, :]
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    width = M.to(tl.int64) * T
    for t0 in range(0, T, BLOCK_T):
        in_block = (t0 + offs_t) < T
        tok = blk * T + t0 + offs_t  # i64 token positions
        inside = in_block & (tok < N)
        acc = tl.zeros([BLOCK_G, BLOCK_T], tl.float32)
        for d0 in tl.static_range(0, HEAD_DIM, BLOCK_D):
            mask_d = (d0 + offs_d) < HEAD_DIM
            q = tl.load(q_ptrs + d0, mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            k = tl.load(k_base + tok[:, None] * stride_kn + d0 + offs_d[None, :],
                        mask=inside[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        acc = tl.where(inside[None, :], acc * scale, float("-inf"))
        out_ptrs = Out + (b.to(tl.int64) * R + rows[:, None]) * width + j * T + t0 + offs_t[None, :]
        tl.store(out_ptrs, acc, mask=mask_g[:, None] & in_block[None, :])


def block_token_scores_triton(q, keys, blocks, block, scale=1.0):
    """Triton launcher (inputs already validated); see ``block_index.block_token_scores``."""
    B, R, D = q.shape
    _, Hk, N, _ = keys.shape
    M = blocks.shape[1]
    G = R // Hk
    out = torch.empty(B, R, M * block, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    q = q.to(keys.dtype).contiguous()
    blocks = blocks.contiguous()
    block_g = triton.next_power_of_2(G)
    _token_kernel[(M, Hk, B)](q, keys, blocks, out, float(scale), N, block, M, R,
                              keys.stride(0), keys.stride(1), keys.stride(2), G=G, HEAD_DIM=D, BLOCK_G=block_g,
                              BLOCK_T=TOKEN_BLOCK_T, BLOCK_D=_block_d(block_g, TOKEN_BLOCK_T, D, 4096), num_warps=4)
    return out
