"""Test helpers: per-dtype tolerances, a verbose ``assert_close`` and seeded random inputs.

Default tolerances (``|actual - expected| <= atol + rtol * |expected|``), keyed by the
dtype the *result was computed in* (pass ``dtype=`` when it differs from the
tensors', e.g. fp32 logits of an fp32-accumulating kernel on fp16 inputs compare
at fp32 tolerance since both sides see identical, exactly representable inputs):

=========  ======  ======  ======================================================
dtype      rtol    atol    why
=========  ======  ======  ======================================================
float64    1e-7    1e-7    reference-grade checks
float32    1e-5    1e-5    ~80 ulp relative: absorbs a different summation order
                           over a few hundred terms (D <= 256); atol covers
                           results that cancel to ~0
float16    1e-3    1e-2    ~1 ulp (2**-10) relative; atol for small outputs of
                           accumulations rounded to fp16
bfloat16   1e-2    5e-2    ~1 ulp (2**-7) relative; same idea
=========  ======  ======  ======================================================
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Callable, Optional, Sequence, Tuple

import torch

__all__ = [
    "run_each",
    "worker_main",
    "DEFAULT_TOLERANCES",
    "tolerances",
    "assert_close",
    "generator",
    "randn",
    "make_qk",
]

DEFAULT_TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}

_PRECISION_ORDER = [torch.float64, torch.float32, torch.float16, torch.bfloat16]  # most to least precise


def tolerances(dtype: torch.dtype) -> Tuple[float, float]:
    """``(rtol, atol)`` for results computed in ``dtype``."""
    try:
        return DEFAULT_TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no default tolerance for {dtype}; known: {list(DEFAULT_TOLERANCES)}") from None


def _least_precise(*dtypes: torch.dtype) -> torch.dtype:
    known = [d for d in dtypes if d in _PRECISION_ORDER]
    if not known:
        return torch.float32
    return max(known, key=_PRECISION_ORDER.index)


def _unravel(flat_index: int, shape: Sequence[int]) -> Tuple[int, ...]:
    idx = []
    for size in reversed(shape):
        idx.append(flat_index % size if size else 0)
        flat_index //= size if size else 1
    return tuple(reversed(idx))


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: Optional[torch.dtype] = None,
    name: str = "",
    *,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    equal_nan: bool = False,
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise (shapes must match).

    ``dtype`` selects the default tolerances (default: the less precise of the two
    tensors' dtypes); ``rtol`` / ``atol`` override them. On failure the message gives
    the number of mismatches, the max abs error with its index and both values there,
    the max relative error, and the index that violates the tolerance most.
    """
    label = f"{name}: " if name else ""
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        raise TypeError(f"{label}assert_close expects tensors, got {type(actual).__name__}, {type(expected).__name__}")
    if actual.shape != expected.shape:
        raise AssertionError(f"{label}shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    d_rtol, d_atol = tolerances(dtype if dtype is not None else _least_precise(actual.dtype, expected.dtype))
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    if actual.numel() == 0:
        return
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    close = torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=equal_nan)
    if bool(close.all()):
        return
    n_bad = int((~close).sum())
    diff = (a - e).abs()
    diff = torch.where(close, torch.nan_to_num(diff, nan=0.0), diff)  # inf == inf is close; its diff is nan
    diff = torch.nan_to_num(diff, nan=math.inf)
    i_abs = int(diff.reshape(-1).argmax())
    excess = torch.where(close, torch.zeros_like(diff), diff / (atol + rtol * e.abs()))
    excess = torch.nan_to_num(excess, nan=math.inf)
    i_worst = int(excess.reshape(-1).argmax())
    rel = diff / e.abs().clamp_min(torch.finfo(torch.float64).tiny)
    shape = tuple(a.shape)
    af, ef = a.reshape(-1), e.reshape(-1)
    raise AssertionError(
        f"{label}{n_bad} / {a.numel()} elements mismatch (rtol={rtol:g}, atol={atol:g}); "
        f"max abs err {float(diff.reshape(-1)[i_abs]):.6g} at index {_unravel(i_abs, shape)}: "
        f"actual={float(af[i_abs]):.8g}, expected={float(ef[i_abs]):.8g}; "
        f"max rel err {float(rel.max()):.6g}; worst violation at index {_unravel(i_worst, shape)}: "
        f"actual={float(af[i_worst]):.8g}, expected={float(ef[i_worst]):.8g}"
    )


def generator(seed: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def randn(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int = 0,
    std: float = 1.0,
) -> torch.Tensor:
    """Seeded N(0, std^2) tensor, drawn in fp32 on the CPU then cast and moved (same values on any device)."""
    x = torch.randn(tuple(shape), generator=generator(seed), dtype=torch.float32) * std
    return x.to(device=device, dtype=dtype)


def make_qk(
    B: int,
    H: int,
    Hk: int,
    N: int,
    D: int,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int = 0,
    layout: str = "contiguous",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random ``q [B, H, D]`` and ``k [B, Hk, N, D]`` with the last dim contiguous.

    ``layout``:
      * ``"contiguous"``: plain tensors.
      * ``"padded"``: k is the first N tokens of a cache with room for more
        (``[B, Hk, N + 37, D][:, :, :N]``) and q a slice of a wider buffer.
      * ``"bnhd"``: k stored as ``[B, N, Hk, D]`` and transposed to ``[B, Hk, N, D]``.
    """
    q = randn((B, H, D), dtype, device, seed=seed)
    if layout == "contiguous":
        k = randn((B, Hk, N, D), dtype, device, seed=seed + 1)
    elif layout == "padded":
        q = randn((B, H, D + 16), dtype, device, seed=seed)[..., 3:D + 3]
        k = randn((B, Hk, N + 37, D), dtype, device, seed=seed + 1)[:, :, :N]
    elif layout == "bnhd":
        k = randn((B, N, Hk, D), dtype, device, seed=seed + 1).transpose(1, 2)
    else:
        raise ValueError(f"unknown layout {layout!r}; valid: 'contiguous', 'padded', 'bnhd'")
    return q, k


def run_each(cases: Sequence[dict], check: Callable[[dict], None]) -> dict:
    """Run `check(case)` for every case, an exception being a failure, and report
    {case id: {"ok", "msg", "seconds"}}: how interpreter workers report to their parent test."""
    results = {}
    for case in cases:
        started = time.perf_counter()
        try:
            check(case)
            ok, msg = True, ""
        except Exception as e:  # reported to the parent test
            ok, msg = False, f"{type(e).__name__}: {e}"
        results[case["id"]] = {"ok": ok, "msg": msg, "seconds": round(time.perf_counter() - started, 3)}
    return results


def worker_main(run_cases: Callable[[list], dict]) -> None:
    """Script entry of an interpreter worker: `python worker.py CASES.json RESULTS.json`."""
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    with open(sys.argv[2], "w") as f:
        json.dump(run_cases(cases), f, indent=1)
