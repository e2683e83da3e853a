"""Triton kernels for :func:`tokaccel.kernels.indexed_decode_attention` and
:func:`tokaccel.kernels.indexed_prefill_attention` (imported only when triton is).

Split-K decode: one program per (split of the L selected columns, KV head, batch row) serves
the G query heads of its KV head from one load of each K/V tile. Per tile it loads the column
indices, gathers the K rows in two halves (the rotate_half pairs; when PERMUTED each half's
columns come from KCOL, the per-head column of every natural dim: FASA's layout), rotates them
to their compact positions in registers when ROPE (cos/sin rows = column numbers), takes the logits of the G
queries with ``tl.dot`` (rows padded to 16), and runs an online softmax into an fp32
accumulator. Partials (max, exp-sum, unnormalised output) are merged in torch.

Prefill: flash-attention style, one program per (block of BLOCK_M queries, query head, batch
row). The Q block is rotated once (rows = positions L - S + i), then column tiles up to the
block's causal bound are gathered and rotated as in decode, masked with ``col_valid & j <= L - S
+ i``, and folded into an online softmax; the output is written straight to [B, S, H, D].

Interpreter caveat (triton 3.9): ``tl.dot`` on bf16 is wrong under TRITON_INTERPRET=1, so the
launchers upcast the dot operands to fp32 there only (``UPCAST``), as grouped_scores does.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .dispatch import AotConfig, interpret_enabled, register_kernel

NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max
_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _blocks(G: int, D: int):
    block_h = max(16, triton.next_power_of_2(D // 2))
    block_l = 32 if D >= 256 else 64
    return max(16, triton.next_power_of_2(G)), block_l, block_h


def _aot_config(dtype: torch.dtype, G: int, D: int, rope: bool, permuted: bool = False) -> AotConfig:
    ty = _TL_DTYPE[dtype]
    block_g, block_l, block_h = _blocks(G, D)
    signature = {
        "Q": f"*{ty}", "K": f"*{ty}", "V": f"*{ty}", "IDX": "*i64", "START": "*i64", "COS": "*fp32", "SIN": "*fp32",
        "KCOL": "*i64", "Acc": "*fp32", "Mx": "*fp32", "Sm": "*fp32", "scale": "fp32", "L": "i32", "SPLIT_L": "i32", "NUM_SPLITS": "i32",
        "stride_qb": "i32", "stride_qh": "i32", "stride_kb": "i32", "stride_kh": "i32", "stride_kn": "i32",
        "stride_vb": "i32", "stride_vh": "i32", "stride_vn": "i32", "stride_ib": "i32", "stride_cp": "i32",
        "G": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_G": "constexpr", "BLOCK_L": "constexpr",
        "BLOCK_H": "constexpr", "ROPE": "constexpr", "PERMUTED": "constexpr", "UPCAST": "constexpr",
    }
    constexprs = {"G": G, "HEAD_DIM": D, "BLOCK_G": block_g, "BLOCK_L": block_l, "BLOCK_H": block_h,
                  "ROPE": rope, "PERMUTED": permuted, "UPCAST": False}
    names = list(signature)
    skip = ("scale", "L", "SPLIT_L", "NUM_SPLITS")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if signature[n] != "constexpr" and n not in skip}
    return AotConfig(name=f"{ty}_G{G}_D{D}_{'rope' if rope else 'plain'}{'_permuted' if permuted else ''}",
                     signature=signature,
                     constexprs=constexprs, attrs=attrs, options={"num_warps": 4, "num_stages": 2})


def aot_configs() -> List[AotConfig]:
    return [
        _aot_config(torch.float16, 4, 128, True),   # Llama-3-8B, compact
        _aot_config(torch.bfloat16, 8, 128, True),  # Llama-3-70B / Qwen3
        _aot_config(torch.bfloat16, 7, 128, False),  # Qwen2-7B, original positions
        _aot_config(torch.bfloat16, 4, 256, True),  # Gemma3 (MQA, D=256)
        _aot_config(torch.float32, 3, 64, True),    # SmolLM2 on fp32
        _aot_config(torch.float16, 1, 96, False),   # MHA, head dim not a power of two
        _aot_config(torch.bfloat16, 4, 128, True, permuted=True),  # FASA's permuted key dims
    ]


@register_kernel(aot_configs, name="indexed_decode_attention")
def _indexed_decode_kernel(
    Q, K, V, IDX, START, COS, SIN, KCOL, Acc, Mx, Sm,
    scale, L, SPLIT_L, NUM_SPLITS,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ib, stride_cp,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_H: tl.constexpr, ROPE: tl.constexpr, PERMUTED: tl.constexpr, UPCAST: tl.constexpr,
):
    # Acc [B, H, NUM_SPLITS, D] fp32; Mx, Sm [B, H, NUM_SPLITS] fp32 (contiguous).
    split = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    H = tl.num_programs(1) * G
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_g = tl.arange(0, BLOCK_G)
    offs_h = tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, BLOCK_L)
    mask_g = offs_g < G
    mask_h = offs_h < HALF
    heads = (hk * G + offs_g).to(tl.int64)

    q_ptrs = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_h[None, :]
    q_mask = mask_g[:, None] & mask_h[None, :]
    q1 = tl.load(q_ptrs, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptrs + HALF, mask=q_mask, other=0.0).to(tl.float32)
    if ROPE:  # the query sits right after the selected keys: position L - 1
        qc = tl.load(COS + (L - 1).to(tl.int64) * stride_cp + offs_h, mask=mask_h, other=0.0)[None, :]
        qs = tl.load(SIN + (L - 1).to(tl.int64) * stride_cp + offs_h, mask=mask_h, other=0.0)[None, :]
        q1, q2 = q1 * qc - q2 * qs, q2 * qc + q1 * qs
    dot_ty = tl.float32 if UPCAST else Q.dtype.element_ty
    q1 = q1.to(Q.dtype.element_ty).to(dot_ty)
    q2 = q2.to(Q.dtype.element_ty).to(dot_ty)

    start_b = tl.load(START + b)
    lo = split * SPLIT_L
    hi = tl.minimum(lo + SPLIT_L, L)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    if PERMUTED:  # the columns holding the natural dims of each half
        kc1 = tl.load(KCOL + hk.to(tl.int64) * HEAD_DIM + offs_h, mask=mask_h, other=0)
        kc2 = tl.load(KCOL + hk.to(tl.int64) * HEAD_DIM + HALF + offs_h, mask=mask_h, other=0)
    else:
        kc1 = offs_h
        kc2 = offs_h + HALF
    m_i = tl.full([BLOCK_G], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc1 = tl.zeros([BLOCK_G, BLOCK_H], tl.float32)
    acc2 = tl.zeros([BLOCK_G, BLOCK_H], tl.float32)
    for j0 in range(lo, hi, BLOCK_L):
        cols = j0 + offs_l
        in_range = cols < hi
        valid = in_range & (cols >= start_b)
        rows = tl.load(IDX + b.to(tl.int64) * stride_ib + cols, mask=in_range, other=0)
        kv_mask = valid[:, None] & mask_h[None, :]
        k_rows = k_base + rows[:, None] * stride_kn
        k1 = tl.load(k_rows + kc1[None, :], mask=kv_mask, other=0.0)
        k2 = tl.load(k_rows + kc2[None, :], mask=kv_mask, other=0.0)
        if ROPE:  # column j sits at compact position j
            c_ptrs = cols[:, None].to(tl.int64) * stride_cp + offs_h[None, :]
            c = tl.load(COS + c_ptrs, mask=kv_mask, other=0.0)
            s = tl.load(SIN + c_ptrs, mask=kv_mask, other=0.0)
            k1f, k2f = k1.to(tl.float32), k2.to(tl.float32)
            k1 = (k1f * c - k2f * s).to(K.dtype.element_ty)
            k2 = (k2f * c + k1f * s).to(K.dtype.element_ty)
        logits = tl.dot(q1, tl.trans(k1.to(dot_ty)), input_precision="ieee")
        logits = tl.dot(q2, tl.trans(k2.to(dot_ty)), logits, input_precision="ieee")
        logits = tl.where(valid[None, :], logits * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(logits - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_ptrs = v_base + rows[:, None] * stride_vn + offs_h[None, :]
        v1 = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(dot_ty)
        v2 = tl.load(v_ptrs + HALF, mask=kv_mask, other=0.0).to(dot_ty)
        pv = p.to(V.dtype.element_ty).to(dot_ty)
        acc1 = tl.dot(pv, v1, acc1 * alpha[:, None], input_precision="ieee")
        acc2 = tl.dot(pv, v2, acc2 * alpha[:, None], input_precision="ieee")
        m_i = m_new

    part = (b.to(tl.int64) * H + heads) * NUM_SPLITS + split  # [BLOCK_G] row of Mx / Sm
    tl.store(Mx + part, m_i, mask=mask_g)
    tl.store(Sm + part, l_i, mask=mask_g)
    a_ptrs = Acc + part[:, None] * HEAD_DIM + offs_h[None, :]
    tl.store(a_ptrs, acc1, mask=q_mask)
    tl.store(a_ptrs + HALF, acc2, mask=q_mask)


def indexed_decode_attention_triton(q, k, v, idx, start, scale, cos=None, sin=None, key_columns=None, *,
                                    splits: Optional[int] = None) -> torch.Tensor:
    """Triton launcher (inputs already validated) -> [B, H, D] in q's dtype.

    ``splits`` overrides the number of column splits (tests)."""
    B, H, D = q.shape
    Hk, L = k.shape[1], idx.shape[1]
    if D % 2 or (cos is not None and cos.shape[1] != D):  # odd or partial rotary: the reference
        from .indexed_attention import indexed_decode_attention_reference

        return indexed_decode_attention_reference(q, k, v, idx, start, scale, cos, sin, key_columns)
    if L == 0:
        return q.new_zeros(B, H, D)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    idx = idx.contiguous()
    start = start.to(torch.long).contiguous()
    rope = cos is not None
    if rope:
        cos, sin = cos.contiguous(), sin.contiguous()
    else:
        cos = sin = torch.empty((1, D), dtype=torch.float32, device=q.device)
    permuted = key_columns is not None
    kcol = key_columns.contiguous() if permuted else idx
    G = H // Hk
    block_g, block_l, block_h = _blocks(G, D)
    if splits is None:  # ~2 waves of programs on a large GPU, at least one tile each
        splits = max(1, min(triton.cdiv(L, block_l), triton.cdiv(256, B * Hk)))
    split_l = triton.cdiv(triton.cdiv(L, splits), block_l) * block_l
    splits = triton.cdiv(L, split_l)
    acc = torch.empty((B, H, splits, D), dtype=torch.float32, device=q.device)
    mx = torch.empty((B, H, splits), dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    upcast = bool(interpret_enabled() and q.dtype == torch.bfloat16)
    args = (q, k, v, idx, start, cos, sin, kcol, acc, mx, sm, float(scale), L, split_l, splits,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            idx.stride(0), cos.stride(0))
    kwargs = dict(G=G, HEAD_DIM=D, BLOCK_G=block_g, BLOCK_L=block_l, BLOCK_H=block_h, ROPE=rope, PERMUTED=permuted,
                  UPCAST=upcast,
                  num_warps=4, num_stages=2)
    grid = (splits, Hk, B)
    if q.device.type == "cuda":
        with torch.cuda.device(q.device):
            _indexed_decode_kernel[grid](*args, **kwargs)
    else:
        _indexed_decode_kernel[grid](*args, **kwargs)
    m = mx.amax(-1, keepdim=True)
    w = torch.exp(mx - m)  # [B, H, S]
    out = (acc * w[..., None]).sum(2) / (sm * w).sum(-1, keepdim=True)
    return out.nan_to_num_(0.0).to(q.dtype)


# --------------------------------------------------------------------------- prefill


def _prefill_blocks(dtype: torch.dtype, D: int, S: int = 1 << 30):
    """(BLOCK_M, BLOCK_N, BLOCK_H); BLOCK_M shrinks for short chunks (tl.dot needs >= 16 rows).

    The gathered, rotated K tile costs registers (per-element pointers, fp32 cos/sin): BLOCK_M = 64
    spills on sm_80 at D = 128 with rope (8-104 values at BLOCK_N 32-64, 4 or 8 warps), so
    BLOCK_M = 32; BLOCK_N = 32 for fp32 (FMA dots) and D >= 256."""
    block_n = 32 if D >= 256 or dtype == torch.float32 else 64
    return min(32, max(16, triton.next_power_of_2(S))), block_n, max(16, triton.next_power_of_2(D // 2))


def _prefill_aot_config(dtype: torch.dtype, G: int, D: int, rope: bool, has_valid: bool = True,
                        permuted: bool = False) -> AotConfig:
    ty = _TL_DTYPE[dtype]
    block_m, block_n, block_h = _prefill_blocks(dtype, D)
    signature = {
        "Q": f"*{ty}", "K": f"*{ty}", "V": f"*{ty}", "IDX": "*i64", "VALID": "*i8", "COS": "*fp32", "SIN": "*fp32",
        "KCOL": "*i64", "Out": f"*{ty}", "scale": "fp32", "S": "i32", "L": "i32",
        "stride_qb": "i32", "stride_qh": "i32", "stride_qs": "i32", "stride_kb": "i32", "stride_kh": "i32",
        "stride_kn": "i32", "stride_vb": "i32", "stride_vh": "i32", "stride_vn": "i32", "stride_ib": "i32",
        "stride_cb": "i32", "stride_cp": "i32",
        "G": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
        "BLOCK_H": "constexpr", "HAS_VALID": "constexpr", "ROPE": "constexpr", "PERMUTED": "constexpr",
        "UPCAST": "constexpr",
    }
    constexprs = {"G": G, "HEAD_DIM": D, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_H": block_h,
                  "HAS_VALID": has_valid, "ROPE": rope, "PERMUTED": permuted, "UPCAST": False}
    names = list(signature)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n] != "constexpr" and n not in ("scale", "S", "L")}
    return AotConfig(name=f"{ty}_G{G}_D{D}_{'rope' if rope else 'plain'}{'' if has_valid else '_novalid'}"
                          f"{'_permuted' if permuted else ''}",
                     signature=signature, constexprs=constexprs, attrs=attrs,
                     options={"num_warps": 4, "num_stages": 2})


def prefill_aot_configs() -> List[AotConfig]:
    return [
        _prefill_aot_config(torch.float32, 3, 64, True),    # SmolLM2 on fp32
        _prefill_aot_config(torch.float16, 4, 128, True),   # Llama-3-8B, compact
        _prefill_aot_config(torch.bfloat16, 4, 128, True),
        _prefill_aot_config(torch.bfloat16, 4, 256, True),  # Gemma3 (D=256)
        _prefill_aot_config(torch.bfloat16, 7, 128, False, has_valid=False),  # Qwen2-7B, original positions
        _prefill_aot_config(torch.bfloat16, 4, 128, True, permuted=True),  # FASA's permuted key dims
    ]


@register_kernel(prefill_aot_configs, name="indexed_prefill_attention")
def _indexed_prefill_kernel(
    Q, K, V, IDX, VALID, COS, SIN, KCOL, Out,
    scale, S, L,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ib, stride_cb, stride_cp,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr, HAS_VALID: tl.constexpr, ROPE: tl.constexpr, PERMUTED: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Out [B, S, H, D] contiguous; VALID [B, L] int8 (read only when HAS_VALID).
    mb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    H = tl.num_programs(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HALF
    q_mask = (offs_m < S)[:, None] & mask_h[None, :]
    pos = L - S + offs_m  # query i's position, also its last readable column

    q_ptrs = Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs + offs_h[None, :]
    q1 = tl.load(q_ptrs, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptrs + HALF, mask=q_mask, other=0.0).to(tl.float32)
    if ROPE:
        qc_ptrs = pos[:, None].to(tl.int64) * stride_cp + offs_h[None, :]
        qc = tl.load(COS + qc_ptrs, mask=q_mask, other=0.0)
        qs = tl.load(SIN + qc_ptrs, mask=q_mask, other=0.0)
        q1, q2 = q1 * qc - q2 * qs, q2 * qc + q1 * qs
    dot_ty = tl.float32 if UPCAST else Q.dtype.element_ty
    q1 = q1.to(Q.dtype.element_ty).to(dot_ty)
    q2 = q2.to(Q.dtype.element_ty).to(dot_ty)

    hk = (h // G).to(tl.int64)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if PERMUTED:  # the columns holding the natural dims of each half
        kc1 = tl.load(KCOL + hk * HEAD_DIM + offs_h, mask=mask_h, other=0)
        kc2 = tl.load(KCOL + hk * HEAD_DIM + HALF + offs_h, mask=mask_h, other=0)
    else:
        kc1 = offs_h
        kc2 = offs_h + HALF
    hi = tl.minimum(L, L - S + (mb + 1) * BLOCK_M)  # the block's causal bound
    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    for j0 in range(0, hi, BLOCK_N):
        cols = j0 + offs_n
        ok = cols < hi
        rows = tl.load(IDX + b * stride_ib + cols, mask=ok, other=0)
        if HAS_VALID:
            ok = ok & (tl.load(VALID + b * stride_cb + cols, mask=ok, other=0) != 0)
        kv_mask = ok[:, None] & mask_h[None, :]
        k_rows = k_base + rows[:, None] * stride_kn
        k1 = tl.load(k_rows + kc1[None, :], mask=kv_mask, other=0.0)
        k2 = tl.load(k_rows + kc2[None, :], mask=kv_mask, other=0.0)
        if ROPE:  # column j sits at compact position j
            c_ptrs = cols[:, None].to(tl.int64) * stride_cp + offs_h[None, :]
            c = tl.load(COS + c_ptrs, mask=kv_mask, other=0.0)
            s = tl.load(SIN + c_ptrs, mask=kv_mask, other=0.0)
            k1f, k2f = k1.to(tl.float32), k2.to(tl.float32)
            k1 = (k1f * c - k2f * s).to(K.dtype.element_ty)
            k2 = (k2f * c + k1f * s).to(K.dtype.element_ty)
        logits = tl.dot(q1, tl.trans(k1.to(dot_ty)), input_precision="ieee")
        logits = tl.dot(q2, tl.trans(k2.to(dot_ty)), logits, input_precision="ieee")
        readable = ok[None, :] & (cols[None, :] <= pos[:, None])
        logits = tl.where(readable, logits * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(logits - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_ptrs = v_base + rows[:, None] * stride_vn + offs_h[None, :]
        v1 = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(dot_ty)
        v2 = tl.load(v_ptrs + HALF, mask=kv_mask, other=0.0).to(dot_ty)
        pv = p.to(V.dtype.element_ty).to(dot_ty)
        acc1 = tl.dot(pv, v1, acc1 * alpha[:, None], input_precision="ieee")
        acc2 = tl.dot(pv, v2, acc2 * alpha[:, None], input_precision="ieee")
        m_i = m_new

    l_i = tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row with no readable column: acc = 0, gives 0
    o_ptrs = Out + ((b * S + offs_m[:, None]) * H + h) * HEAD_DIM + offs_h[None, :]
    tl.store(o_ptrs, (acc1 / l_i).to(Out.dtype.element_ty), mask=q_mask)
    tl.store(o_ptrs + HALF, (acc2 / l_i).to(Out.dtype.element_ty), mask=q_mask)


def indexed_prefill_attention_triton(q, k, v, idx, col_valid, scale, cos=None, sin=None, key_columns=None
                                     ) -> torch.Tensor:
    """Triton launcher (inputs already validated) -> [B, S, H, D] in q's dtype."""
    B, H, S, D = q.shape
    Hk, L = k.shape[1], idx.shape[1]
    if D % 2 or (cos is not None and cos.shape[1] != D):  # odd or partial rotary: the reference
        from .indexed_attention import indexed_prefill_attention_reference

        return indexed_prefill_attention_reference(q, k, v, idx, col_valid, scale, cos, sin, key_columns)
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    idx = idx.contiguous()
    has_valid = col_valid is not None
    valid = col_valid.contiguous().view(torch.int8) if has_valid else torch.empty((1, 1), dtype=torch.int8,
                                                                                   device=q.device)
    rope = cos is not None
    if rope:
        cos, sin = cos.contiguous(), sin.contiguous()
    else:
        cos = sin = torch.empty((1, D), dtype=torch.float32, device=q.device)
    permuted = key_columns is not None
    kcol = key_columns.contiguous() if permuted else idx
    block_m, block_n, block_h = _prefill_blocks(q.dtype, D, S)
    upcast = bool(interpret_enabled() and q.dtype == torch.bfloat16)
    args = (q, k, v, idx, valid, cos, sin, kcol, out, float(scale), S, L,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), idx.stride(0), valid.stride(0), cos.stride(0))
    kwargs = dict(G=H // Hk, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_H=block_h, HAS_VALID=has_valid,
                  ROPE=rope, PERMUTED=permuted, UPCAST=upcast, num_warps=4, num_stages=2)
    grid = (triton.cdiv(S, block_m), H, B)
    if q.device.type == "cuda":
        with torch.cuda.device(q.device):
            _indexed_prefill_kernel[grid](*args, **kwargs)
    else:
        _indexed_prefill_kernel[grid](*args, **kwargs)
    return out
