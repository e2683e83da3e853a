"""Triton kernels for :func:`tokaccel.kernels.last_row.last_row_attention` (imported only when triton is).

Pass 1 (``last_row_stats``): one program per (query head, batch) streams its KV head's keys
once and keeps an online max / exp-sum of the masked logits (fp32). Pass 2 (``last_row_mean``):
one program per (key tile, batch) recomputes every head's logits for its tile and accumulates
``exp(s - max_h) / sum_h`` over heads; the result is divided by H. Keys are read H/Hk + 1 times
per KV head in total (tiny next to the layer's own attention).
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from .dispatch import AotConfig, register_kernel



def block_n(D: int) -> int:
    """Key tile: the fp32 [BLOCK_N, D] product stays at 2048 values (16 per thread with 4 warps)."""
    return max(16, 2048 // D)

NEG_BIG = tl.constexpr(-1.0e30)
_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _signature(ty: str) -> dict:
    return {"Q": f"*{ty}", "K": f"*{ty}", "Valid": "*i8", "M": "*fp32", "L": "*fp32", "Out": "*fp32",
            "scale": "fp32", "N": "i32", "H": "i32", "G": "i32", "stride_qb": "i32", "stride_qh": "i32",
            "stride_kb": "i32", "stride_kh": "i32", "stride_kn": "i32", "HAS_VALID": "constexpr",
            "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}


def _configs(name: str) -> List[AotConfig]:
    out = []
    for ty, has_valid, D in (("fp16", True, 128), ("bf16", False, 64)):
        out.append(AotConfig(name=f"{ty}_d{D}_valid{int(has_valid)}", signature=_signature(ty),
                             constexprs={"HAS_VALID": has_valid, "BLOCK_N": block_n(D), "BLOCK_D": D},
                             attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]},
                             options={"num_warps": 4, "num_stages": 1}))
    return out


@triton.jit
def _logits(Q, K, Valid, b, h, n0, scale, N, G, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
            HAS_VALID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    inside = offs_n < N
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_d).to(tl.float32)
    kp = K + b.to(tl.int64) * stride_kb + (h // G).to(tl.int64) * stride_kh
    kt = tl.load(kp + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=inside[:, None], other=0.0)
    s = tl.sum(kt.to(tl.float32) * q[None, :], axis=1) * scale
    ok = inside
    if HAS_VALID:
        ok = ok & (tl.load(Valid + b.to(tl.int64) * N + offs_n, mask=inside, other=0) != 0)
    return tl.where(ok, s, float("-inf"))


@register_kernel(lambda: _configs("stats"), name="last_row_stats")
def _stats_kernel(Q, K, Valid, M, L, Out, scale, N, H, G, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                  HAS_VALID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.program_id(0)
    b = tl.program_id(1)
    m_i = tl.full([BLOCK_N], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        s = _logits(Q, K, Valid, b, h, n0, scale, N, G, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                    HAS_VALID, BLOCK_N, BLOCK_D)
        m_new = tl.maximum(m_i, s)
        l_i = l_i * tl.exp(m_i - m_new) + tl.exp(s - m_new)
        m_i = m_new
    m = tl.max(m_i, axis=0)
    l = tl.sum(l_i * tl.exp(m_i - m), axis=0)
    tl.store(M + b * H + h, m)
    tl.store(L + b * H + h, l)


@register_kernel(lambda: _configs("mean"), name="last_row_mean")
def _mean_kernel(Q, K, Valid, M, L, Out, scale, N, H, G, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                 HAS_VALID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for h in range(0, H):
        s = _logits(Q, K, Valid, b, h, n0, scale, N, G, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                    HAS_VALID, BLOCK_N, BLOCK_D)
        m = tl.load(M + b * H + h)
        l = tl.load(L + b * H + h)
        acc += tl.where(l > 0, tl.exp(s - m) / l, 0.0)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    tl.store(Out + b.to(tl.int64) * N + offs_n, acc / H, mask=offs_n < N)


def last_row_attention_triton(q, k, scale: float, valid=None) -> torch.Tensor:
    B, H, D = q.shape
    _, Hk, N, _ = k.shape
    if D & (D - 1) or D < 16:
        from .last_row import last_row_attention_reference  # odd head dims: rare, use the reference

        return last_row_attention_reference(q, k, scale, valid)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    m = torch.empty(B, H, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    out = torch.empty(B, N, dtype=torch.float32, device=q.device)
    v = valid.to(torch.int8).contiguous() if valid is not None else m  # unread without HAS_VALID
    args = (q, k, v, m, l, out, float(scale), N, H, H // Hk, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            k.stride(2))
    meta = dict(HAS_VALID=valid is not None, BLOCK_N=block_n(D), BLOCK_D=D, num_warps=4)
    _stats_kernel[(H, B)](*args, **meta)
    _mean_kernel[(triton.cdiv(N, block_n(D)), B)](*args, **meta)
    return out
