"""Backend dispatch and the registries of ops and Triton kernels.

Every op has a torch reference (the spec, and the CPU implementation) and, when
Triton is importable, a Triton launcher. :func:`resolve_backend` picks one:

* ``backend="torch"``  -> the reference, always.
* ``backend="triton"`` -> the Triton launcher. CUDA tensors run compiled kernels;
  CPU tensors run them in Triton's interpreter (slow, for tests).
* ``backend=None``     -> Triton when Triton is importable and every tensor is on
  CUDA, or when Triton runs in interpreter mode (then CPU tensors run in the
  interpreter, which is how tests exercise the kernels without a GPU); the
  reference otherwise.

Interpreter mode is a property of the process: triton 3.9 reads ``TRITON_INTERPRET``
when a function is decorated with ``triton.jit``, and ``triton.language``'s own
helpers (``tl.zeros``, ``tl.sum``, ...) are decorated when ``triton`` is first
imported. An interpreted kernel cannot call compiled helpers and the AOT compiler
cannot use interpreted ones, so ``TRITON_INTERPRET=1`` must be set before triton is
imported (tests run interpreter comparisons in a subprocess), and
:func:`interpret_enabled` reports the mode triton was imported in. Registered
kernels are decorated lazily in that same mode, whatever the environment was when
this package was imported.

The kernel registry (:data:`KERNELS`) holds, for each Triton kernel, its Python
function and a function returning representative :class:`AotConfig` s (signature,
constexprs, options) that :mod:`tokaccel.kernels.aot` compiles for a GPU target
without a GPU.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

try:  # Triton is optional: without it only the torch references are used.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

BACKENDS = ("torch", "triton")

__all__ = [
    "HAS_TRITON",
    "BACKENDS",
    "AotConfig",
    "KernelEntry",
    "Op",
    "KERNELS",
    "OPS",
    "interpret_enabled",
    "resolve_backend",
    "register_op",
    "register_kernel",
    "get_op",
    "list_ops",
    "list_kernels",
]


def interpret_enabled() -> bool:
    """True when triton was imported in interpreter mode (``TRITON_INTERPRET=1`` set before import).

    Then every Triton kernel runs in the interpreter (on the host, numpy-backed);
    otherwise kernels are compiled and need CUDA tensors. False without triton.
    """
    if not HAS_TRITON:
        return False
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.standard.zeros, JITFunction)


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# --------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class AotConfig:
    """One representative specialisation of a kernel for ahead-of-time compilation.

    ``signature`` maps every argument name to a Triton type string (``"*fp16"``,
    ``"i32"``, ``"fp32"``, ``"constexpr"``); ``constexprs`` gives the constexpr
    values; ``attrs`` maps argument indices ``(i,)`` to attributes such as
    ``[["tt.divisibility", 16]]`` (what a launch with 16-byte aligned pointers gets);
    ``options`` are compile options (``num_warps``, ``num_stages``).
    """

    name: str
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    attrs: Dict[tuple, list] = field(default_factory=dict)
    options: Dict[str, Any] = field(default_factory=dict)


class KernelEntry:
    """A registered Triton kernel.

    ``fn`` is the undecorated Python function, ``aot_configs()`` its representative
    specialisations, and ``kernel`` the function decorated in the mode triton was
    imported in (a ``JITFunction``, or an ``InterpretedFunction`` in interpreter
    mode); launch it with ``entry[grid](*args, **constexprs_and_options)``.
    """

    def __init__(self, fn: Callable, aot_configs: Callable[[], List[AotConfig]], name: Optional[str] = None):
        if not HAS_TRITON:  # pragma: no cover
            raise RuntimeError("triton is not importable; cannot register a Triton kernel")
        self.fn = fn
        self.name = name or fn.__name__
        self.aot_configs = aot_configs
        self._kernel = None
        self._interpreted: Optional[bool] = None

    @property
    def kernel(self):
        """``triton.jit``-equivalent of ``fn`` for the current process mode (built on first use)."""
        interpreted = interpret_enabled()
        if self._kernel is None or self._interpreted != interpreted:
            if interpreted:
                from triton.runtime.interpreter import InterpretedFunction

                self._kernel = InterpretedFunction(self.fn)
            else:
                from triton.runtime.jit import JITFunction

                self._kernel = JITFunction(self.fn)
            self._interpreted = interpreted
        return self._kernel

    def __getitem__(self, grid):
        return self.kernel[grid]

    def __repr__(self) -> str:
        return f"KernelEntry({self.name!r})"


KERNELS: Dict[str, KernelEntry] = {}


def register_kernel(aot_configs: Callable[[], List[AotConfig]], name: Optional[str] = None):
    """Decorator: register a Triton kernel function (undecorated) and return its :class:`KernelEntry`.

    ``aot_configs()`` returns the representative specialisations compiled by the AOT test.
    """

    def deco(fn: Callable) -> KernelEntry:
        entry = KernelEntry(fn, aot_configs, name)
        if entry.name in KERNELS:
            raise ValueError(f"Triton kernel {entry.name!r} is already registered")
        KERNELS[entry.name] = entry
        return entry

    return deco


def list_kernels() -> List[str]:
    """Names of every registered Triton kernel."""
    return sorted(KERNELS)


# --------------------------------------------------------------------------- ops


@dataclass
class Op:
    """An op: a torch reference and an optional Triton launcher with the same signature."""

    name: str
    reference: Callable[..., Any]
    triton: Optional[Callable[..., Any]] = None

    def __call__(self, *args, backend: Optional[str] = None, **kwargs):
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        chosen = resolve_backend(backend, tensors, has_triton_impl=self.triton is not None, op=self.name)
        logger.debug("%s: %s backend", self.name, chosen)
        if chosen == "torch":
            return self.reference(*args, **kwargs)
        return self.triton(*args, **kwargs)


OPS: Dict[str, Op] = {}


def register_op(name: str, reference: Callable, triton_launcher: Optional[Callable] = None) -> Op:
    """Register an op under ``name``; ``triton_launcher`` is None when Triton is unavailable."""
    if name in OPS:
        raise ValueError(f"op {name!r} is already registered")
    op = Op(name, reference, triton_launcher if HAS_TRITON else None)
    OPS[name] = op
    return op


def get_op(name: str) -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; registered ops: {sorted(OPS)}") from None


def list_ops() -> List[str]:
    return sorted(OPS)


_warned_env_mismatch = False


def resolve_backend(
    backend: Optional[str],
    tensors: Sequence[torch.Tensor],
    has_triton_impl: bool = True,
    op: str = "op",
) -> str:
    """Return ``"torch"`` or ``"triton"`` for these tensors (see the module docstring).

    Raises ValueError for an unknown backend name, and RuntimeError when ``"triton"``
    is forced but cannot run: triton (or a Triton implementation of the op) is
    missing, or a tensor is not on CUDA and triton is not in interpreter mode.
    """
    global _warned_env_mismatch
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {BACKENDS} or None (automatic)")
    if backend == "torch":
        return "torch"
    interpreted = interpret_enabled()
    on_cuda = all(t.device.type == "cuda" for t in tensors)
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{op}: backend='triton' requested but triton is not importable")
        if not has_triton_impl:
            raise RuntimeError(f"{op}: has no Triton implementation")
        if not (interpreted or on_cuda):
            devices = sorted({str(t.device) for t in tensors})
            raise RuntimeError(
                f"{op}: backend='triton' needs CUDA tensors (got {devices}) or Triton's interpreter; "
                "set TRITON_INTERPRET=1 before triton is first imported to run it on CPU"
            )
        return "triton"
    if not (HAS_TRITON and has_triton_impl):
        return "torch"
    if interpreted:
        return "triton"
    if _interpret_env() and not _warned_env_mismatch:
        _warned_env_mismatch = True
        logger.warning(
            "TRITON_INTERPRET is set but triton was imported before it was; Triton kernels "
            "cannot run in the interpreter in this process, using torch references for CPU tensors"
        )
    if tensors and on_cuda:
        return "triton"
    return "torch"
