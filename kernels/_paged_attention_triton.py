"""Triton kernels for :func:`tokaccel.kernels.paged_attention.paged_indexed_attention` and
:func:`tokaccel.kernels.paged_attention.paged_key_scores` (imported only when triton is).

Both read vLLM's CUDA cache ``[num_blocks, BS, Hk, D]`` (strided views, last-dim stride 1) through
the block table: token t of sequence b is row ``t % BS`` of block ``block_table[b, t // BS]``; the
row's address is ``block * stride_n + (t % BS) * stride_s + hk * stride_h`` (int64: a large cache
exceeds 2**31 elements). BS is a constexpr (vLLM's block sizes are powers of two).

Attention: one program per (KV head, sequence) serves the G query heads of its KV head from one
load of each K/V tile. Per tile of BLOCK_L entries it loads the positions and valid flags, looks up
their blocks, gathers the K rows, takes the G x BLOCK_L logits with ``tl.dot`` (G padded to 16) and
runs an online softmax into an fp32 accumulator; the output is written in q's dtype.

Key scores: one program per (tile of BLOCK_N tokens, KV head, sequence): the G x BLOCK_N raw
logits of the tile, -inf past the sequence's length; tokens past the length are not loaded.

Interpreter caveat (triton 3.9): ``tl.dot`` on bf16 is wrong under TRITON_INTERPRET=1, so the
launchers upcast the dot operands to fp32 there only (``UPCAST``), as the other kernels do.
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from .dispatch import AotConfig, interpret_enabled, register_kernel

NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max
_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _blocks(G: int, D: int):
    """(BLOCK_G, BLOCK_L, BLOCK_D): G padded to tl.dot's 16 rows, tokens per tile, D padded to a power of 2."""
    block_d = max(16, triton.next_power_of_2(D))
    return max(16, triton.next_power_of_2(G)), (32 if block_d >= 256 else 64), block_d


def _divisible(signature, skip):
    """tt.divisibility 16 on every pointer / stride argument not in ``skip`` (what aligned launches get)."""
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(signature)
            if signature[n] != "constexpr" and n not in skip}


# --------------------------------------------------------------------------- attention


def _aot_config(dtype: torch.dtype, G: int, D: int, bs: int) -> AotConfig:
    ty = _TL_DTYPE[dtype]
    block_g, block_l, block_d = _blocks(G, D)
    signature = {
        "Q": f"*{ty}", "KC": f"*{ty}", "VC": f"*{ty}", "BT": "*i32", "IDX": "*i64", "VALID": "*i8", "Out": f"*{ty}",
        "scale": "fp32", "L": "i32", "stride_qb": "i32", "stride_qh": "i32",
        "stride_kn": "i32", "stride_ks": "i32", "stride_kh": "i32", "stride_vn": "i32", "stride_vs": "i32",
        "stride_vh": "i32", "stride_tb": "i32", "stride_ib": "i32", "stride_mb": "i32",
        "G": "constexpr", "HEAD_DIM": "constexpr", "BS": "constexpr", "BLOCK_G": "constexpr",
        "BLOCK_L": "constexpr", "BLOCK_D": "constexpr", "UPCAST": "constexpr",
    }
    constexprs = {"G": G, "HEAD_DIM": D, "BS": bs, "BLOCK_G": block_g, "BLOCK_L": block_l, "BLOCK_D": block_d,
                  "UPCAST": False}
    attrs = _divisible(signature, ("scale", "L", "stride_tb", "stride_ib", "stride_mb"))
    return AotConfig(name=f"{ty}_G{G}_D{D}_bs{bs}", signature=signature, constexprs=constexprs, attrs=attrs,
                     options={"num_warps": 4, "num_stages": 2})


def aot_configs() -> List[AotConfig]:
    return [
        _aot_config(torch.float16, 4, 128, 16),   # Llama-3-8B, vLLM's default block size
        _aot_config(torch.bfloat16, 8, 128, 16),  # Llama-3-70B / Qwen3
        _aot_config(torch.bfloat16, 7, 128, 32),  # Qwen2-7B
        _aot_config(torch.bfloat16, 2, 256, 16),  # Gemma (D=256)
        _aot_config(torch.float32, 3, 64, 16),    # SmolLM2 on fp32
        _aot_config(torch.float16, 1, 96, 16),    # MHA, head dim not a power of two
    ]


@register_kernel(aot_configs, name="paged_indexed_attention")
def _paged_attention_kernel(
    Q, KC, VC, BT, IDX, VALID, Out,
    scale, L,
    stride_qb, stride_qh, stride_kn, stride_ks, stride_kh, stride_vn, stride_vs, stride_vh,
    stride_tb, stride_ib, stride_mb,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    # Out [B, H, D] contiguous; VALID [B, L] int8; BT [B, M] int32.
    hk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    H = tl.num_programs(0) * G
    offs_g = tl.arange(0, BLOCK_G)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    mask_d = offs_d < HEAD_DIM
    heads = hk * G + offs_g
    q_mask = mask_g[:, None] & mask_d[None, :]
    dot_ty = tl.float32 if UPCAST else Q.dtype.element_ty
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    q = q.to(dot_ty)

    k_base = KC + hk * stride_kh
    v_base = VC + hk * stride_vh
    m_i = tl.full([BLOCK_G], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for j0 in range(0, L, BLOCK_L):
        cols = j0 + offs_l
        ok = cols < L
        ok = ok & (tl.load(VALID + b * stride_mb + cols, mask=ok, other=0) != 0)
        pos = tl.load(IDX + b * stride_ib + cols, mask=ok, other=0)
        blk = tl.load(BT + b * stride_tb + pos // BS, mask=ok, other=0).to(tl.int64)
        off = pos % BS
        kv_mask = ok[:, None] & mask_d[None, :]
        k = tl.load(k_base + (blk * stride_kn + off * stride_ks)[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        logits = tl.dot(q, tl.trans(k.to(dot_ty)), input_precision="ieee")  # [BLOCK_G, BLOCK_L] fp32
        logits = tl.where(ok[None, :], logits * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(logits - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + (blk * stride_vn + off * stride_vs)[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        pv = p.to(VC.dtype.element_ty).to(dot_ty)
        acc = tl.dot(pv, v.to(dot_ty), acc * alpha[:, None], input_precision="ieee")
        m_i = m_new

    l_i = tl.where(l_i > 0, l_i, 1.0)[:, None]  # no valid entry: acc = 0, gives 0
    o_ptrs = Out + (b * H + heads)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i).to(Out.dtype.element_ty), mask=q_mask)


def _launch(kernel, grid, args, kwargs, device) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def paged_indexed_attention_triton(q, key_cache, value_cache, block_table, idx, valid, scale) -> torch.Tensor:
    """Triton launcher (inputs already validated) -> [B, H, D] in q's dtype."""
    B, H, D = q.shape
    Hk, bs, L = key_cache.shape[2], key_cache.shape[1], idx.shape[1]
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if L == 0:
        return out.zero_()
    q = q if q.stride(-1) == 1 else q.contiguous()
    table = block_table.to(torch.int32).contiguous()
    idx = idx.contiguous()
    mask = valid.contiguous().view(torch.int8)
    G = H // Hk
    block_g, block_l, block_d = _blocks(G, D)
    upcast = bool(interpret_enabled() and q.dtype == torch.bfloat16)
    args = (q, key_cache, value_cache, table, idx, mask, out, float(scale), L,
            q.stride(0), q.stride(1), *key_cache.stride()[:3], *value_cache.stride()[:3],
            table.stride(0), idx.stride(0), mask.stride(0))
    kwargs = dict(G=G, HEAD_DIM=D, BS=bs, BLOCK_G=block_g, BLOCK_L=block_l, BLOCK_D=block_d, UPCAST=upcast,
                  num_warps=4, num_stages=2)
    _launch(_paged_attention_kernel, (Hk, B), args, kwargs, q.device)
    return out


# --------------------------------------------------------------------------- key scores


def _scores_aot_config(dtype: torch.dtype, G: int, D: int, bs: int) -> AotConfig:
    ty = _TL_DTYPE[dtype]
    block_g, block_n, block_d = _blocks(G, D)
    signature = {
        "Q": f"*{ty}", "KC": f"*{ty}", "BT": "*i32", "LEN": "*i32", "Out": "*fp32", "N": "i32",
        "stride_qb": "i32", "stride_qh": "i32", "stride_kn": "i32", "stride_ks": "i32", "stride_kh": "i32",
        "stride_tb": "i32",
        "G": "constexpr", "HEAD_DIM": "constexpr", "BS": "constexpr", "BLOCK_G": "constexpr",
        "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "UPCAST": "constexpr",
    }
    constexprs = {"G": G, "HEAD_DIM": D, "BS": bs, "BLOCK_G": block_g, "BLOCK_N": block_n, "BLOCK_D": block_d,
                  "UPCAST": False}
    attrs = _divisible(signature, ("N", "stride_tb"))
    return AotConfig(name=f"{ty}_G{G}_D{D}_bs{bs}", signature=signature, constexprs=constexprs, attrs=attrs,
                     options={"num_warps": 4, "num_stages": 2})


def scores_aot_configs() -> List[AotConfig]:
    return [
        _scores_aot_config(torch.float16, 4, 128, 16),
        _scores_aot_config(torch.bfloat16, 8, 128, 16),
        _scores_aot_config(torch.bfloat16, 7, 128, 32),
        _scores_aot_config(torch.bfloat16, 2, 256, 16),
        _scores_aot_config(torch.float32, 3, 64, 16),
        _scores_aot_config(torch.float16, 1, 96, 16),
    ]


@register_kernel(scores_aot_configs, name="paged_key_scores")
def _paged_key_scores_kernel(
    Q, KC, BT, LEN, Out, N,
    stride_qb, stride_qh, stride_kn, stride_ks, stride_kh, stride_tb,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    # Out [B, H, N] fp32 contiguous; LEN [B] int32; BT [B, M] int32.
    tile = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    H = tl.num_programs(1) * G
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    t = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_g = offs_g < G
    mask_d = offs_d < HEAD_DIM
    heads = hk * G + offs_g
    dot_ty = tl.float32 if UPCAST else Q.dtype.element_ty
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(dot_ty)

    live = t < tl.load(LEN + b)
    blk = tl.load(BT + b * stride_tb + t // BS, mask=live, other=0).to(tl.int64)
    rows = blk * stride_kn + (t % BS).to(tl.int64) * stride_ks + hk * stride_kh
    k = tl.load(KC + rows[:, None] + offs_d[None, :], mask=live[:, None] & mask_d[None, :], other=0.0)
    scores = tl.dot(q, tl.trans(k.to(dot_ty)), input_precision="ieee")  # [BLOCK_G, BLOCK_N] fp32
    scores = tl.where(live[None, :], scores, float("-inf"))
    o_ptrs = Out + (b * H + heads)[:, None] * N + t[None, :]
    tl.store(o_ptrs, scores, mask=mask_g[:, None] & (t < N)[None, :])


def paged_key_scores_triton(q, key_cache, block_table, lengths, max_len: int) -> torch.Tensor:
    """Triton launcher (inputs already validated, ``max_len`` = N) -> [B, H, N] fp32."""
    B, H, D = q.shape
    Hk, bs, N = key_cache.shape[2], key_cache.shape[1], int(max_len)
    out = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    table = block_table.to(torch.int32).contiguous()
    lens = lengths.to(torch.int32).contiguous()
    G = H // Hk
    block_g, block_n, block_d = _blocks(G, D)
    upcast = bool(interpret_enabled() and q.dtype == torch.bfloat16)
    args = (q, key_cache, table, lens, out, N, q.stride(0), q.stride(1), *key_cache.stride()[:3], table.stride(0))
    kwargs = dict(G=G, HEAD_DIM=D, BS=bs, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d, UPCAST=upcast,
                  num_warps=4, num_stages=2)
    _launch(_paged_key_scores_kernel, (triton.cdiv(N, block_n), Hk, B), args, kwargs, q.device)
    return out
