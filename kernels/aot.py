"""Ahead-of-time compilation of the registered Triton kernels for a CUDA target, no GPU needed.

For each :class:`~tokaccel.kernels.dispatch.AotConfig` of a kernel this runs the
whole Triton pipeline (ttir -> ttgir -> llir -> ptx -> cubin, ptxas included,
which triton ships) with::

    triton.compile(triton.compiler.ASTSource(fn=jit_fn, signature=..., constexprs=..., attrs=...),
                   target=triton.backends.compiler.GPUTarget("cuda", cap, 32), options=...)

and reports registers and spills. Where the numbers come from (triton 3.9):

* ``CompiledKernel.n_regs`` / ``n_spills`` only exist after the kernel is loaded on a
  GPU (``driver.active.utils.load_binary`` -> ``cuFuncGetAttribute``; triton's
  ``n_spills`` is ``CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4``). The metadata has
  ``shared``, ``num_warps``, ``num_stages`` but no register counts.
* triton runs ``ptxas -v`` itself and discards the log unless
  ``knobs.nvidia.dump_ptxas_log`` is set, in which case it ``print``s it. We set it
  (and ``knobs.compilation.always_compile`` so a cache hit still runs ptxas) and
  capture stdout: ``Used N registers`` and ``N bytes stack frame, N bytes spill
  stores, N bytes spill loads`` of this exact compile.
* The cubin triton produced is also read with the ``cuobjdump`` triton ships
  (``--dump-resource-usage``: ``REG``, ``STACK``, ``LOCAL``), a cross-check of the
  register count that does not depend on the log.

Report fields per config: ``n_regs`` (registers per thread), ``n_spills`` (32-bit
values spilled: ptxas spill-store bytes / 4), ``spill_store_bytes``,
``spill_load_bytes``, ``stack_frame_bytes``, ``cubin_regs``, ``cubin_stack_bytes``,
``cubin_local_bytes``, ``shared_bytes``, ``num_warps``, ``num_stages``, ``compile_s``,
``ok``/``error``.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from .dispatch import HAS_TRITON, KERNELS, AotConfig, KernelEntry, interpret_enabled

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CAPS", "compile_for", "compile_config", "compile_all", "write_report", "parse_ptxas_log"]

DEFAULT_CAPS = (80, 90)

_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _require_compiler() -> None:
    if not HAS_TRITON:
        raise RuntimeError("AOT compilation needs triton, which is not importable")
    if interpret_enabled():
        raise RuntimeError(
            "AOT compilation needs triton imported without TRITON_INTERPRET=1 (in interpreter mode "
            "triton.language's helpers are interpreted functions the compiler cannot use)"
        )


def parse_ptxas_log(log: str) -> Dict[str, Optional[int]]:
    """Registers and spill/stack bytes from a ``ptxas -v`` log (one entry function)."""
    regs = _RE_REGS.search(log)
    frame = _RE_FRAME.search(log)
    return {
        "ptxas_regs": int(regs.group(1)) if regs else None,
        "stack_frame_bytes": int(frame.group(1)) if frame else None,
        "spill_store_bytes": int(frame.group(2)) if frame else None,
        "spill_load_bytes": int(frame.group(3)) if frame else None,
    }


def _cubin_resource_usage(cubin: bytes) -> Dict[str, Optional[int]]:
    """REG / STACK / LOCAL of the (single) kernel in a cubin, via triton's cuobjdump."""
    import triton

    empty = {"cubin_regs": None, "cubin_stack_bytes": None, "cubin_local_bytes": None}
    try:
        tool = triton.knobs.nvidia.cuobjdump.path
    except Exception as e:  # pragma: no cover - tool missing in this triton build
        logger.warning("cuobjdump not available: %s", e)
        return empty
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        try:
            out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                                 check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            logger.warning("cuobjdump failed: %s", e)
            return empty
    m = _RE_RES.search(out)
    if not m:
        return empty
    return {"cubin_regs": int(m.group(1)), "cubin_stack_bytes": int(m.group(2)),
            "cubin_local_bytes": int(m.group(4))}


def compile_config(entry: KernelEntry, config: AotConfig, cap: int, options: Optional[Dict[str, Any]] = None
                   ) -> Dict[str, Any]:
    """Compile one config of ``entry`` for ``sm_<cap>``; never raises for a compile error (``ok=False``).

    ``options`` (e.g. ``{"maxnreg": 32}``) are merged over ``config.options``.
    """
    _require_compiler()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    opts = {**config.options, **(options or {})}
    row: Dict[str, Any] = {
        "kernel": entry.name, "config": config.name, "cap": cap, "constexprs": dict(config.constexprs),
        "num_warps": opts.get("num_warps"), "num_stages": opts.get("num_stages"), "ok": False, "error": None,
        "n_regs": None, "n_spills": None, "shared_bytes": None,
    }
    src = ASTSource(fn=entry.kernel, signature=dict(config.signature),
                    constexprs=dict(config.constexprs), attrs=dict(config.attrs))
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope():
            triton.knobs.nvidia.dump_ptxas_log = True
            triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
            with contextlib.redirect_stdout(buf):
                compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=opts)
    except Exception as e:  # report, don't raise: the test asserts on ok
        row["error"] = f"{type(e).__name__}: {e}"
        row["compile_s"] = round(time.perf_counter() - t0, 3)
        logger.error("AOT %s/%s sm_%d failed: %s", entry.name, config.name, cap, row["error"])
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 3)
    md = compiled.metadata
    row.update(num_warps=md.num_warps, num_stages=md.num_stages, shared_bytes=md.shared, arch=str(md.arch))
    row.update(parse_ptxas_log(buf.getvalue()))
    row.update(_cubin_resource_usage(compiled.asm["cubin"]))
    row["n_regs"] = row["ptxas_regs"] if row["ptxas_regs"] is not None else row["cubin_regs"]
    if row["spill_store_bytes"] is not None:
        row["n_spills"] = row["spill_store_bytes"] // 4
    row["ok"] = True
    logger.info("AOT %s/%s sm_%d: %s regs, %s spills, %s B shared", entry.name, config.name, cap,
                row["n_regs"], row["n_spills"], row["shared_bytes"])
    return row


def compile_for(kernel_entry: Union[KernelEntry, str], cap: int,
                configs: Optional[Sequence[AotConfig]] = None) -> Dict[str, Any]:
    """Compile every AOT config of a kernel for ``sm_<cap>`` (80, 90, ...).

    Returns ``{"kernel", "cap", "ok", "configs": [row, ...]}``; see the module docstring
    for the row fields.
    """
    entry = KERNELS[kernel_entry] if isinstance(kernel_entry, str) else kernel_entry
    rows = [compile_config(entry, c, cap) for c in (configs if configs is not None else entry.aot_configs())]
    return {"kernel": entry.name, "cap": cap, "ok": bool(rows) and all(r["ok"] for r in rows), "configs": rows}


def _ptxas_versions(caps: Iterable[int]) -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {}
    for cap in caps:
        try:  # internal helper of triton's NVIDIA backend; informational only
            from triton.backends.nvidia.compiler import get_ptxas_version

            m = re.search(r"release ([\d.]+)", get_ptxas_version(cap))
            out[str(cap)] = m.group(1) if m else None
        except Exception:  # pragma: no cover
            out[str(cap)] = None
    return out


def compile_all(caps: Sequence[int] = DEFAULT_CAPS, kernels: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """Compile every registered kernel (or those named) for every cap; one report dict."""
    _require_compiler()
    import triton

    names = list(kernels) if kernels is not None else sorted(KERNELS)
    reports: List[Dict[str, Any]] = [compile_for(KERNELS[n], cap) for n in names for cap in caps]
    return {
        "triton_version": triton.__version__,
        "ptxas_version": _ptxas_versions(caps),
        "caps": list(caps),
        "ok": all(r["ok"] for r in reports),
        "reports": reports,
    }


def write_report(report: Dict[str, Any], path: Union[str, os.PathLike]) -> str:
    """Write a report as JSON (creating parent folders); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True, default=str)
    return path
