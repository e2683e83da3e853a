"""Triton kernels for :func:`tokaccel.kernels.decode_attention_probs` and
:func:`tokaccel.kernels.attention_column_sums` (imported only when triton is).

Decode, two kernels:

* ``decode_attention_probs`` (split): one program per (key split, KV head, batch row) serves the G
  query heads of its KV head from one load of each K/V tile (``tl.dot`` with the G rows padded to
  16, as in indexed decode). It writes the raw scaled logits to a [B, H, N] fp32 scratch and its
  partial softmax (max, exp-sum, unnormalised output) per head.
* ``decode_attention_probs_combine``: one program per (key tile, KV head, batch row) merges the
  split partials of its G heads into each head's lse, writes ``probs = mean_g exp(logit - lse_g)``
  for its key tile, and (key tile 0 only) the normalised output.

Column sums, two kernels:

* ``attention_lse`` (only when lse is not given): one program per (query tile, query head, batch
  row), an online log-sum-exp over the key tiles up to the tile's causal bound (flash style, no V).
* ``attention_column_sums``: one program per (key tile, KV head, batch row) holds its K tile, loops
  over the G heads and over the query tiles that can see the tile (causal: from the first query at
  or after the tile's first key), and sums ``w_i * exp2(s * log2e - lse * log2e)`` over queries in
  fp32 registers. Each output element has one writer: no atomics.

Interpreter caveat (triton 3.9): ``tl.dot`` on bf16 is wrong under TRITON_INTERPRET=1, so the
launchers upcast the dot operands to fp32 there only (``UPCAST``), as grouped_scores does.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .dispatch import AotConfig, interpret_enabled, register_kernel

NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
COMBINE_BLOCK_N = 128
_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _divisible_attrs(signature, skip) -> dict:
    """tt.divisibility 16 for every pointer / stride (what a launch with aligned tensors gets)."""
    return {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(signature.items())
            if t != "constexpr" and n not in skip}


def _launch(kernel, grid, device, *args, **kwargs) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask_int8(mask: Optional[torch.Tensor], device) -> torch.Tensor:
    return mask.contiguous().view(torch.int8) if mask is not None else torch.empty(1, dtype=torch.int8, device=device)


# --------------------------------------------------------------------------- decode


def _decode_blocks(G: int, D: int):
    """(BLOCK_G, BLOCK_N, BLOCK_D): G rows padded to >= 16 for tl.dot, the whole head dim at once."""
    return max(16, triton.next_power_of_2(G)), 32 if D > 128 else 64, max(16, triton.next_power_of_2(D))


def _split_aot_config(dtype: torch.dtype, G: int, D: int, has_valid: bool) -> AotConfig:
    ty = _TL_DTYPE[dtype]
    block_g, block_n, block_d = _decode_blocks(G, D)
    signature = {
        "Q": f"*{ty}", "K": f"*{ty}", "V": f"*{ty}", "VALID": "*i8", "Logits": "*fp32", "Acc": "*fp32",
        "Mx": "*fp32", "Sm": "*fp32", "scale": "fp32", "N": "i32", "SPLIT_N": "i32", "NUM_SPLITS": "i32",
        "stride_qb": "i32", "stride_qh": "i32", "stride_kb": "i32", "stride_kh": "i32", "stride_kn": "i32",
        "stride_vb": "i32", "stride_vh": "i32", "stride_vn": "i32",
        "G": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_G": "constexpr", "BLOCK_N": "constexpr",
        "BLOCK_D": "constexpr", "HAS_VALID": "constexpr", "UPCAST": "constexpr",
    }
    constexprs = {"G": G, "HEAD_DIM": D, "BLOCK_G": block_g, "BLOCK_N": block_n, "BLOCK_D": block_d,
                  "HAS_VALID": has_valid, "UPCAST": False}
    return AotConfig(name=f"{ty}_G{G}_D{D}{'_valid' if has_valid else ''}", signature=signature,
                     constexprs=constexprs, attrs=_divisible_attrs(signature, ("scale", "N", "SPLIT_N", "NUM_SPLITS")),
                     options={"num_warps": 4, "num_stages": 2})


def split_aot_configs() -> List[AotConfig]:
    return [
        _split_aot_config(torch.float16, 4, 128, True),    # Llama-3-8B with padding
        _split_aot_config(torch.bfloat16, 8, 128, False),  # Llama-3-70B / Qwen3
        _split_aot_config(torch.bfloat16, 2, 256, True),   # Gemma (D=256)
        _split_aot_config(torch.float32, 3, 64, True),     # SmolLM2 on fp32
        _split_aot_config(torch.float16, 1, 80, False),    # MHA, head dim not a power of two
    ]


@register_kernel(split_aot_configs, name="decode_attention_probs")
def _decode_split_kernel(
    Q, K, V, VALID, Logits, Acc, Mx, Sm,
    scale, N, SPLIT_N, NUM_SPLITS,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_VALID: tl.constexpr, UPCAST: tl.constexpr,
):
    # VALID [B, Hk, N] int8; Logits [B, H, N], Acc [B, H, NUM_SPLITS, D], Mx / Sm [B, H, NUM_SPLITS]:
    # fp32, contiguous.
    split = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Hk = tl.num_programs(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    mask_d = offs_d < HEAD_DIM
    rows = b * Hk * G + hk * G + offs_g  # [BLOCK_G] rows of the [B * H, ...] buffers

    dot_ty = tl.float32 if UPCAST else Q.dtype.element_ty
    q_ptrs = Q + b * stride_qb + (hk * G + offs_g)[:, None].to(tl.int64) * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(dot_ty)
    k_base = K + b * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + hk.to(tl.int64) * stride_vh
    valid_base = VALID + (b * Hk + hk) * N

    lo = split * SPLIT_N
    hi = tl.minimum(lo + SPLIT_N, N)
    m_i = tl.full([BLOCK_G], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + offs_n
        in_range = cols < hi
        ok = in_range
        if HAS_VALID:
            ok = ok & (tl.load(valid_base + cols, mask=in_range, other=0) != 0)
        kv_mask = ok[:, None] & mask_d[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(dot_ty)), input_precision="ieee") * scale
        s = tl.where(ok[None, :], s, float("-inf"))
        tl.store(Logits + rows[:, None] * N + cols[None, :], s, mask=mask_g[:, None] & in_range[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(V.dtype.element_ty).to(dot_ty), v.to(dot_ty), acc * alpha[:, None], input_precision="ieee")
        m_i = m_new

    part = rows * NUM_SPLITS + split
    tl.store(Mx + part, m_i, mask=mask_g)
    tl.store(Sm + part, l_i, mask=mask_g)
    tl.store(Acc + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_g[:, None] & mask_d[None, :])


def _combine_aot_config(dtype: torch.dtype, G: int, D: int, block_s: int) -> AotConfig:
    ty = _TL_DTYPE[dtype]
    block_g, _, block_d = _decode_blocks(G, D)
    signature = {
        "Logits": "*fp32", "Acc": "*fp32", "Mx": "*fp32", "Sm": "*fp32", "Out": f"*{ty}", "Probs": "*fp32",
        "N": "i32", "NUM_SPLITS": "i32",
        "G": "constexpr", "HEAD_DIM": "constexpr", "BLOCK_G": "constexpr", "BLOCK_S": "constexpr",
        "BLOCK_N": "constexpr", "BLOCK_D": "constexpr",
    }
    constexprs = {"G": G, "HEAD_DIM": D, "BLOCK_G": block_g, "BLOCK_S": block_s, "BLOCK_N": COMBINE_BLOCK_N,
                  "BLOCK_D": block_d}
    return AotConfig(name=f"{ty}_G{G}_D{D}_s{block_s}", signature=signature, constexprs=constexprs,
                     attrs=_divisible_attrs(signature, ("N", "NUM_SPLITS")), options={"num_warps": 4, "num_stages": 1})


def combine_aot_configs() -> List[AotConfig]:
    return [
        _combine_aot_config(torch.float16, 4, 128, 64),
        _combine_aot_config(torch.bfloat16, 8, 256, 256),
        _combine_aot_config(torch.float32, 3, 64, 8),
    ]


@register_kernel(combine_aot_configs, name="decode_attention_probs_combine")
def _decode_combine_kernel(
    Logits, Acc, Mx, Sm, Out, Probs, N, NUM_SPLITS,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Out [B, H, D], Probs [B, Hk, N] contiguous; the other buffers as in the split kernel.
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Hk = tl.num_programs(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    mask_g = offs_g < G
    rows = b * Hk * G + hk * G + offs_g

    sm_mask = mask_g[:, None] & (offs_s < NUM_SPLITS)[None, :]
    mx = tl.load(Mx + rows[:, None] * NUM_SPLITS + offs_s[None, :], mask=sm_mask, other=NEG_BIG)
    sm = tl.load(Sm + rows[:, None] * NUM_SPLITS + offs_s[None, :], mask=sm_mask, other=0.0)
    m = tl.max(mx, axis=1)
    l = tl.sum(sm * tl.exp(mx - m[:, None]), axis=1)
    l = tl.where(mask_g, l, 1.0)  # padded rows
    lse = m + tl.log(l)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    x = tl.load(Logits + rows[:, None] * N + cols[None, :], mask=mask_g[:, None] & mask_n[None, :],
                other=float("-inf"))
    p = tl.exp(x - lse[:, None])  # invalid keys hold -inf: exactly 0
    tl.store(Probs + (b * Hk + hk) * N + cols, tl.sum(p, axis=0) / G, mask=mask_n)

    if pid_n == 0:
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for s in range(NUM_SPLITS):
            part = rows * NUM_SPLITS + s
            w = tl.exp(tl.load(Mx + part, mask=mask_g, other=NEG_BIG) - m)
            a = tl.load(Acc + part[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_g[:, None] & mask_d[None, :],
                        other=0.0)
            acc += w[:, None] * a
        out = acc / l[:, None]
        tl.store(Out + rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=mask_g[:, None] & mask_d[None, :])


def decode_attention_probs_triton(q, k, v, scale, key_valid=None, *, splits: Optional[int] = None):
    """Triton launcher (inputs already validated) -> (out [B, H, D] q's dtype, probs [B, Hk, N] fp32).

    ``splits`` overrides the number of key splits (tests)."""
    B, H, D = q.shape
    Hk, N = k.shape[1], k.shape[2]
    G = H // Hk
    dev = q.device
    out = torch.empty((B, H, D), dtype=q.dtype, device=dev)
    probs = torch.empty((B, Hk, N), dtype=torch.float32, device=dev)
    if B == 0:
        return out, probs
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    valid = _mask_int8(key_valid, dev)
    block_g, block_n, block_d = _decode_blocks(G, D)
    if splits is None:  # ~2 waves of programs on a large GPU, at least one tile each
        splits = max(1, min(triton.cdiv(N, block_n), triton.cdiv(256, B * Hk)))
    split_n = triton.cdiv(triton.cdiv(N, splits), block_n) * block_n
    splits = triton.cdiv(N, split_n)
    logits = torch.empty((B, H, N), dtype=torch.float32, device=dev)
    acc = torch.empty((B, H, splits, D), dtype=torch.float32, device=dev)
    mx = torch.empty((B, H, splits), dtype=torch.float32, device=dev)
    sm = torch.empty_like(mx)
    upcast = bool(interpret_enabled() and q.dtype == torch.bfloat16)
    _launch(_decode_split_kernel, (splits, Hk, B), dev,
            q, k, v, valid, logits, acc, mx, sm, float(scale), N, split_n, splits,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            G=G, HEAD_DIM=D, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d, HAS_VALID=key_valid is not None,
            UPCAST=upcast, num_warps=4, num_stages=2)
    _launch(_decode_combine_kernel, (triton.cdiv(N, COMBINE_BLOCK_N), Hk, B), dev,
            logits, acc, mx, sm, out, probs, N, splits,
            G=G, HEAD_DIM=D, BLOCK_G=block_g, BLOCK_S=max(2, triton.next_power_of_2(splits)),
            BLOCK_N=COMBINE_BLOCK_N, BLOCK_D=block_d, num_warps=4, num_stages=1)
    return out, probs


# --------------------------------------------------------------------------- column sums


def _colsum_blocks(dtype: torch.dtype, D: int, S: int = 1 << 30):
    """(BLOCK_M, BLOCK_N, BLOCK_D); 32-row tiles for fp32 (FMA dots) and D > 128, BLOCK_M shrinks
    for short prefills (tl.dot needs >= 16 rows)."""
    block = 32 if D > 128 or dtype == torch.float32 else 64
    return min(block, max(16, triton.next_power_of_2(S))), block, max(16, triton.next_power_of_2(D))


_QK_SIGNATURE = {"stride_qb": "i32", "stride_qh": "i32", "stride_qs": "i32", "stride_kb": "i32",
                 "stride_kh": "i32", "stride_kn": "i32"}
_QK_CONSTEXPRS = ("G", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "BLOCK_D", "CAUSAL", "HAS_VALID")


def _colsum_aot_config(kind: str, dtype: torch.dtype, G: int, D: int, causal: bool, has_valid: bool,
                       has_w: bool = False) -> AotConfig:
    ty = _TL_DTYPE[dtype]
    block_m, block_n, block_d = _colsum_blocks(dtype, D)
    if kind == "lse":
        head = {"Q": f"*{ty}", "K": f"*{ty}", "VALID": "*i8", "Lse": "*fp32"}
    else:
        head = {"Q": f"*{ty}", "K": f"*{ty}", "VALID": "*i8", "Lse": "*fp32", "W": "*fp32", "Out": "*fp32"}
    signature = {**head, "scale": "fp32", "S": "i32", "N": "i32", **_QK_SIGNATURE,
                 **{n: "constexpr" for n in _QK_CONSTEXPRS}, **({} if kind == "lse" else {"HAS_W": "constexpr"}),
                 "UPCAST": "constexpr"}
    constexprs = {"G": G, "HEAD_DIM": D, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d,
                  "CAUSAL": causal, "HAS_VALID": has_valid, "UPCAST": False}
    if kind != "lse":
        constexprs["HAS_W"] = has_w
    name = f"{ty}_G{G}_D{D}{'_causal' if causal else ''}{'_valid' if has_valid else ''}{'_w' if has_w else ''}"
    return AotConfig(name=name, signature=signature, constexprs=constexprs,
                     attrs=_divisible_attrs(signature, ("scale", "S", "N")), options={"num_warps": 4, "num_stages": 2})


def _colsum_cases():
    return [(torch.float16, 4, 128, True, True, True),    # Llama-3-8B prefill with padding
            (torch.bfloat16, 8, 128, True, False, False),  # Llama-3-70B / Qwen3
            (torch.bfloat16, 2, 256, True, True, True),    # Gemma (D=256)
            (torch.float32, 3, 64, False, True, False)]    # SmolLM2 on fp32, not causal


def lse_aot_configs() -> List[AotConfig]:
    return [_colsum_aot_config("lse", *c[:5]) for c in _colsum_cases()]


def colsum_aot_configs() -> List[AotConfig]:
    return [_colsum_aot_config("colsum", *c) for c in _colsum_cases()]


@register_kernel(lse_aot_configs, name="attention_lse")
def _lse_kernel(
    Q, K, VALID, Lse, scale, S, N,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_kn,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, UPCAST: tl.constexpr,
):
    # Lse [B, H, S] fp32 contiguous (natural log; -inf for a row with no allowed key).
    mb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    H = tl.num_programs(1)
    hk = (h // G).to(tl.int64)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < S
    mask_d = offs_d < HEAD_DIM
    dot_ty = tl.float32 if UPCAST else Q.dtype.element_ty
    q_ptrs = Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(dot_ty)
    k_base = K + b * stride_kb + hk * stride_kh
    valid_base = VALID + (b * (H // G) + hk) * N
    pos = N - S + offs_m  # query i's key position: its last readable key when causal
    qk_scale = scale * LOG2E

    hi = N
    if CAUSAL:
        hi = tl.minimum(N, N - S + (mb + 1) * BLOCK_M)
    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, hi, BLOCK_N):
        cols = j0 + offs_n
        ok = cols < hi
        if HAS_VALID:
            ok = ok & (tl.load(valid_base + cols, mask=ok, other=0) != 0)
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                    mask=ok[:, None] & mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k.to(dot_ty)), input_precision="ieee") * qk_scale
        allowed = ok[None, :]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= pos[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(Lse + (b * H + h) * S + offs_m, lse, mask=mask_m)


@register_kernel(colsum_aot_configs, name="attention_column_sums")
def _colsum_kernel(
    Q, K, VALID, Lse, W, Out, scale, S, N,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_kn,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, HAS_W: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Lse [B, H, S] fp32, W [B, S] fp32 (read when HAS_W), Out [B, Hk, N] fp32: contiguous.
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Hk = tl.num_programs(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < N
    if HAS_VALID:
        ok = ok & (tl.load(VALID + (b * Hk + hk) * N + cols, mask=ok, other=0) != 0)
    dot_ty = tl.float32 if UPCAST else Q.dtype.element_ty
    k = tl.load(K + b * stride_kb + hk.to(tl.int64) * stride_kh + cols[:, None].to(tl.int64) * stride_kn
                + offs_d[None, :], mask=ok[:, None] & mask_d[None, :], other=0.0)
    kt = tl.trans(k.to(dot_ty))
    qk_scale = scale * LOG2E

    m_lo = 0
    if CAUSAL:  # query i sees key j iff i >= j - (N - S): skip the tiles before the tile's first key
        m_lo = (tl.maximum(pid_n * BLOCK_N - (N - S), 0) // BLOCK_M) * BLOCK_M
    acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(G):
        h = (hk * G + g).to(tl.int64)
        q_base = Q + b * stride_qb + h * stride_qh
        lse_base = Lse + (b * Hk * G + h) * S
        for m0 in range(m_lo, S, BLOCK_M):
            qi = m0 + offs_m
            mask_m = qi < S
            q = tl.load(q_base + qi[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
                        mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            lse = tl.load(lse_base + qi, mask=mask_m, other=float("-inf"))
            keep = lse > float("-inf")  # a row with no allowed key contributes 0 (NaN lse too)
            if HAS_W:
                w = tl.load(W + b * S + qi, mask=mask_m, other=0.0)
                keep = keep & (w != 0)
            lse2 = tl.where(keep, lse * LOG2E, float("inf"))
            s = tl.dot(q.to(dot_ty), kt, input_precision="ieee") * qk_scale - lse2[:, None]
            allowed = ok[None, :]
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= (N - S + qi)[:, None])
            p = tl.where(allowed, tl.exp2(s), 0.0)
            if HAS_W:
                p = p * w[:, None]
            acc += tl.sum(p, axis=0)
    tl.store(Out + (b * Hk + hk) * N + cols, acc / G, mask=cols < N)


def attention_column_sums_triton(q, k, scale, *, causal=True, key_valid=None, query_valid=None,
                                 query_weight=None, lse=None, tile=256) -> torch.Tensor:
    """Triton launcher (inputs already validated) -> colsum [B, Hk, N] fp32; ``tile`` is unused."""
    from .eviction import query_weights

    B, H, S, D = q.shape
    Hk, N = k.shape[1], k.shape[2]
    G = H // Hk
    dev = q.device
    out = torch.empty((B, Hk, N), dtype=torch.float32, device=dev)
    if S == 0 or B == 0:
        return out.zero_()
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    valid = _mask_int8(key_valid, dev)
    w = query_weights(query_valid, query_weight)
    w = w.contiguous() if w is not None else torch.empty(1, dtype=torch.float32, device=dev)
    block_m, block_n, block_d = _colsum_blocks(q.dtype, D, S)
    upcast = bool(interpret_enabled() and q.dtype == torch.bfloat16)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    blocks = dict(G=G, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, CAUSAL=bool(causal),
                  HAS_VALID=key_valid is not None)
    if lse is None:
        lse = torch.empty((B, H, S), dtype=torch.float32, device=dev)
        _launch(_lse_kernel, (triton.cdiv(S, block_m), H, B), dev, q, k, valid, lse, float(scale), S, N, *strides,
                **blocks, UPCAST=upcast, num_warps=4, num_stages=2)
    else:
        lse = lse.contiguous()
    _launch(_colsum_kernel, (triton.cdiv(N, block_n), Hk, B), dev, q, k, valid, lse, w, out, float(scale), S, N,
            *strides, **blocks, HAS_W=query_valid is not None or query_weight is not None, UPCAST=upcast,
            num_warps=4, num_stages=2)
    return out
