"""Triton kernel for :func:`tokaccel.kernels.grouped_scores` (imported only when triton is).

One program per (key tile of BLOCK_N tokens, KV head, batch). It loads the K tile
once (in BLOCK_D chunks along the head dim) and computes the logits of all G query
heads that read this KV head:

* ``USE_DOT=True`` (G >= ``DOT_MIN_GROUP``): ``tl.dot`` of the G query rows, padded
  to BLOCK_G >= 16, against the K tile in its storage dtype with fp32 accumulation
  (tensor cores on GPU).
* ``USE_DOT=False`` (small G): broadcasted multiply and sum in fp32 (no padding of
  the G rows to 16).

Interpreter caveat (triton 3.9): ``tl.dot`` on bf16 operands is wrong under
``TRITON_INTERPRET=1`` (bf16 is held as uint16 and ``np.matmul`` multiplies the bit
patterns). The launcher therefore sets ``UPCAST=True`` for bf16 in interpreter mode
only, which converts the operands to fp32 before the dot; compiled GPU kernels use
the native bf16 dot (``UPCAST=False``), and that is what the AOT test compiles.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional

import torch
import triton
import triton.language as tl

from .dispatch import AotConfig, interpret_enabled, register_kernel

logger = logging.getLogger(__name__)

DOT_MIN_GROUP = 4  # use tl.dot when G >= this (tensor cores); broadcast-sum below

_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class GroupedScoresConfig:
    """Block sizes and launch options for one (G, D, dtype)."""

    BLOCK_G: int
    BLOCK_N: int
    BLOCK_D: int
    USE_DOT: bool
    num_warps: int = 4
    num_stages: int = 1
    # Explicit (mul+add -> FMA, the more accurate form): triton 3.9 warns that its default
    # flips to False in 3.10.
    enable_fp_fusion: bool = True


def choose_config(G: int, D: int, dtype: torch.dtype, use_dot: Optional[bool] = None) -> GroupedScoresConfig:
    """Heuristic config (not yet tuned on a GPU); ``use_dot`` forces a code path.

    Broadcast path: BLOCK_G * BLOCK_N * BLOCK_D <= 4096 keeps the fp32 product
    temporary at <= 32 values per thread with 4 warps (46-66 registers on sm_80/90,
    no spills; 8192 needed up to 96 registers).
    """
    p2d = triton.next_power_of_2(D)
    if use_dot is None:
        use_dot = G >= DOT_MIN_GROUP
    if use_dot:
        return GroupedScoresConfig(
            BLOCK_G=max(16, triton.next_power_of_2(G)),
            BLOCK_N=64,
            BLOCK_D=min(64, max(16, p2d)),
            USE_DOT=True,
        )
    block_g = triton.next_power_of_2(G)
    block_n = 64
    block_d = min(p2d, max(16, 4096 // (block_g * block_n)))
    return GroupedScoresConfig(BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d, USE_DOT=False)


def _aot_config(dtype: torch.dtype, G: int, D: int) -> AotConfig:
    cfg = choose_config(G, D, dtype)
    ty = _TL_DTYPE[dtype]
    signature = {
        "Q": f"*{ty}", "K": f"*{ty}", "Out": "*fp32", "scale": "fp32", "N": "i32",
        "stride_qb": "i32", "stride_qh": "i32",
        "stride_kb": "i32", "stride_kh": "i32", "stride_kn": "i32",
        "stride_ob": "i32", "stride_oh": "i32",
        "G": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_G": "constexpr", "BLOCK_N": "constexpr",
        "BLOCK_D": "constexpr", "USE_DOT": "constexpr", "UPCAST": "constexpr",
    }
    constexprs = {
        "G": G, "HEAD_DIM": D, "BLOCK_G": cfg.BLOCK_G, "BLOCK_N": cfg.BLOCK_N, "BLOCK_D": cfg.BLOCK_D,
        "USE_DOT": cfg.USE_DOT, "UPCAST": False,
    }
    # What a launch with 16-byte aligned pointers and strides that are multiples of 16 gets
    # (every argument except scale and N).
    names = list(signature)
    divisible = [i for i, n in enumerate(names) if signature[n] != "constexpr" and n not in ("scale", "N")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    path = "dot" if cfg.USE_DOT else "bcast"
    return AotConfig(
        name=f"{ty}_G{G}_D{D}_{path}",
        signature=signature,
        constexprs=constexprs,
        attrs=attrs,
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": cfg.enable_fp_fusion},
    )


def aot_configs() -> List[AotConfig]:
    """Representative specialisations: both code paths, every dtype, D in {64, 96, 128, 256}."""
    return [
        _aot_config(torch.float16, 4, 128),   # Llama-3-8B / Mistral-7B
        _aot_config(torch.bfloat16, 8, 128),  # Llama-3-70B / Qwen3
        _aot_config(torch.bfloat16, 8, 256),
        _aot_config(torch.float32, 8, 128),
        _aot_config(torch.float16, 4, 96),    # head dim that is not a power of two
        _aot_config(torch.float16, 1, 128),   # MHA
        _aot_config(torch.bfloat16, 2, 256),
        _aot_config(torch.float32, 3, 64),
    ]


@register_kernel(aot_configs, name="grouped_scores")
def _grouped_scores_kernel(
    Q, K, Out, scale, N,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_ob, stride_oh,
    G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
):
    # Q [B, H, D], K [B, Hk, N, D] (last dims contiguous), Out [B, H, N] fp32.
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    n0 = pid_n * BLOCK_N

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    mask_n = (n0 + offs_n) < N
    heads = (hk * G + offs_g).to(tl.int64)  # query heads of this KV head (padded rows masked)

    q_ptrs = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    k_ptrs = (K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + n0.to(tl.int64) * stride_kn
              + offs_n[:, None] * stride_kn + offs_d[None, :])

    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for d0 in tl.static_range(0, HEAD_DIM, BLOCK_D):
        if HEAD_DIM % BLOCK_D == 0:
            q = tl.load(q_ptrs + d0, mask=mask_g[:, None], other=0.0)
            k = tl.load(k_ptrs + d0, mask=mask_n[:, None], other=0.0)
        else:
            mask_d = (d0 + offs_d) < HEAD_DIM
            q = tl.load(q_ptrs + d0, mask=mask_g[:, None] & mask_d[None, :], other=0.0)
            k = tl.load(k_ptrs + d0, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if USE_DOT:
            if UPCAST:
                q = q.to(tl.float32)
                k = k.to(tl.float32)
            acc = tl.dot(q, tl.trans(k), acc, input_precision="ieee")
        else:
            acc += tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    acc = acc * scale

    out_ptrs = Out + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + (n0 + offs_n)[None, :]
    tl.store(out_ptrs, acc, mask=mask_g[:, None] & mask_n[None, :])


grouped_scores_kernel = _grouped_scores_kernel  # the KernelEntry


def grouped_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: Optional[float] = None,
    *,
    config: Optional[GroupedScoresConfig] = None,
) -> torch.Tensor:
    """Triton launcher: q [B, H, D], k [B, Hk, N, D] -> [B, H, N] fp32 (inputs already validated).

    ``config`` overrides :func:`choose_config` (tests, benchmarks).
    """
    B, H, D = q.shape
    _, Hk, N, _ = k.shape
    G = H // Hk
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        logger.debug("grouped_scores: k has last-dim stride %d; copying to contiguous", k.stride(-1))
        k = k.contiguous()
    out = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    cfg = config or choose_config(G, D, q.dtype)
    interpret = interpret_enabled()
    upcast = bool(interpret and cfg.USE_DOT and q.dtype == torch.bfloat16)
    grid = (triton.cdiv(N, cfg.BLOCK_N), Hk, B)
    args = (
        q, k, out, 1.0 if scale is None else float(scale), N,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1),
    )
    kwargs = dict(
        G=G, HEAD_DIM=D, BLOCK_G=cfg.BLOCK_G, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D,
        USE_DOT=cfg.USE_DOT, UPCAST=upcast, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=cfg.enable_fp_fusion,
    )
    if q.device.type == "cuda":
        with torch.cuda.device(q.device):
            grouped_scores_kernel[grid](*args, **kwargs)
    else:
        grouped_scores_kernel[grid](*args, **kwargs)
    return out
