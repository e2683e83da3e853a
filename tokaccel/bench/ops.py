"""Op-level benchmark (`tokaccel bench ops`): one attention step of one layer on random K/V.

For each attention shape and each cache length N, every registered implementation ("impl")
runs its decode step (or selection-cache hit / miss steps) and its prefill chunk, split into
parts, timed interleaved with the dense SDPA baseline (see timing.py). Each row reports time,
bytes read, achieved bandwidth (bytes_read / time) and its ratio to the device's measured copy
bandwidth: a memory-bound decode step cannot beat ratio ~1.

Notation (docs/methods.md): B batch, H query heads, Hk KV heads, G = H // Hk, N cached tokens,
D head dim, c prefill chunk length. Query head h reads KV head h // G.

Plugin interface: how a policy adds its op-level steps
-------------------------------------------------------
A setup function receives one `OpCase` and returns an `OpBench`, or None when it has no step for
that case (phase, device, dtype)::

    from tokaccel.bench.ops import OpBench, OpCase, register_op_bench, kv_bytes

    def tokenselect_setup(case: OpCase) -> OpBench | None:
        if case.phase not in ("decode_hit", "decode_miss", "prefill_chunk"):
            return None                       # "decode" is for impls without a selection cache
        x = case.inputs                       # shared random tensors, see OpInputs
        k = case.config.get("k", 2048)        # from the impl spec "tokenselect:k=1024"
        state = ...                           # build what the step needs (untimed), e.g. set the
                                              # selection cache so that this phase hits / misses
        scores = ...; idx = ...               # precomputed inputs of the later parts
        return OpBench(
            parts={                           # zero-argument callables; "total" is required
                "score": lambda: grouped_scores(x.q[:, :, 0], x.k),
                "topk": lambda: scores.topk(k, dim=-1),
                "gather": lambda: ...,
                "attention": lambda: ...,
                "total": lambda: step(x.q, x.k, x.v, state),   # the whole step, as a model runs it
            },
            bytes_read={"score": kv_bytes(case, x.n, values=False), "total": ...},  # per part
            flops={"total": ...},             # optional
            info={"k": k, "keys_read": ...},  # optional extra columns
        )

    register_op_bench("tokenselect", tokenselect_setup, description="TokenSelect (docs/methods.md §1.1)")

Make the registration run on import of a module and add that module's name to
`OP_BENCH_MODULES` (or pass `--plugin module.name` on the command line); the registry imports
those modules the first time it is read, so `import tokaccel` stays free of benchmark code.
Each part is timed separately, interleaved with the others and with the baseline; a part must
not depend on side effects of another part (precompute its inputs in setup). "total" is what the
speedup column compares with the baseline's "total". Phases:

- "decode": one query token against N cached tokens (impls without a selection cache);
- "decode_hit" / "decode_miss": a decode step whose selection cache hits / misses;
- "prefill_chunk": the last c tokens of an N-token prompt attend causally to all N.

The baseline of the decode phases is the "sdpa" impl's "decode"; of "prefill_chunk" its
"prefill_chunk". Built in: "sdpa" (torch SDPA, enable_gqa), "dense" (tokaccel's dense
attention, i.e. HF's sdpa_attention_forward as a patched model runs it), "gqa_matmul" (decode
as two grouped matmuls, split into "score" and "attention" parts) and, on CUDA with flash-attn
installed and fp16/bf16, "flash" (flash_attn_func).
"""

from __future__ import annotations

import gc
import importlib
import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..models import warn_if_slow_dtype
from ..registry import parse_spec
from .timing import copy_bandwidth, is_cuda, paired_ratio, synchronize, time_interleaved

logger = logging.getLogger(__name__)

PHASES = ("decode", "decode_hit", "decode_miss", "prefill_chunk")
PARTS = ("score", "topk", "gather", "attention", "total")
BASELINE = "sdpa"
CPU_SWEEP = (4096, 16384, 32768, 65536, 131072)
CUDA_SWEEP = (4096, 16384, 32768, 65536, 131072, 262144, 524288, 1048576)
# Modules imported on first use of the registry; each calls register_op_bench at import.
OP_BENCH_MODULES: tuple[str, ...] = ("tokaccel.bench.selection_ops",)


@dataclass(frozen=True)
class AttnShape:
    """One attention layer's head layout: H query heads, Hk KV heads, head dim D."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads


SHAPES = {
    "smollm2": AttnShape("smollm2", 9, 3, 64),
    "gemma3-global": AttnShape("gemma3-global", 4, 1, 256),
    "llama3-8b": AttnShape("llama3-8b", 32, 8, 128),
}


@dataclass
class OpInputs:
    """Random tensors shared by every impl of one (shape, N, batch, chunk, dtype, device):
    q [B, H, 1, D] (decode query), q_chunk [B, H, c, D] (the prompt's last c queries),
    k, v [B, Hk, N, D] (the cache layout, not repeated for GQA, RoPE already applied)."""

    q: torch.Tensor
    q_chunk: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    @property
    def n(self) -> int:
        return self.k.shape[2]

    @property
    def chunk(self) -> int:
        return self.q_chunk.shape[2]

    @cached_property
    def chunk_mask(self) -> torch.Tensor:
        """bool [c, N]: query i of the chunk (position N - c + i) sees keys 0 .. N - c + i."""
        c, n = self.chunk, self.n
        return torch.ones(c, n, dtype=torch.bool, device=self.k.device).tril(n - c)

    @classmethod
    def random(cls, shape: AttnShape, n: int, batch: int, chunk: int, dtype, device, seed: int = 0) -> "OpInputs":
        gen = torch.Generator(device=device).manual_seed(seed)

        def randn(*size):  # drawn on the device itself, in `dtype`: no host copy, no fp32 temporary
            return torch.randn(*size, generator=gen, dtype=dtype, device=device)

        H, Hk, D = shape.num_heads, shape.num_kv_heads, shape.head_dim
        k, v = randn(batch, Hk, n, D), randn(batch, Hk, n, D)
        return cls(q=randn(batch, H, 1, D), q_chunk=randn(batch, H, min(chunk, n), D), k=k, v=v)


@dataclass
class OpCase:
    """What a setup function is asked to build: `phase` of impl `impl` (its spec name) with
    `config` (parsed from "name:key=val,..."), at N = `n` cached tokens of `shape`."""

    impl: str
    config: dict
    shape: AttnShape
    n: int
    phase: str
    batch: int
    chunk: int
    dtype: torch.dtype
    device: torch.device
    inputs: OpInputs

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclass
class OpBench:
    """An impl's step for one OpCase: callables per part ("total" required) and their bytes read."""

    parts: dict[str, Callable[[], Any]]
    bytes_read: dict[str, int]
    flops: dict[str, int] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    state: Any = None  # the step's state for inspection after a call (a selection layer); never reported

    def __post_init__(self) -> None:
        if "total" not in self.parts:
            raise ValueError(f"OpBench needs a 'total' part; got {sorted(self.parts)}")


@dataclass(frozen=True)
class OpBenchEntry:
    name: str
    setup: Callable[[OpCase], OpBench | None]
    description: str = ""


_REGISTRY: dict[str, OpBenchEntry] = {}
_modules_loaded: set[str] = set()


def register_op_bench(name: str, setup_fn: Callable[[OpCase], OpBench | None], description: str = "",
                      replace: bool = False) -> None:
    """Register an impl's setup function under `name` (see the module docstring)."""
    key = name.lower()
    if key in _REGISTRY and not replace:
        raise ValueError(f"op bench {name!r} is already registered; pass replace=True to override it")
    _REGISTRY[key] = OpBenchEntry(key, setup_fn, description)


def unregister_op_bench(name: str) -> None:
    _REGISTRY.pop(name.lower(), None)


def op_benches(extra_modules: Sequence[str] = ()) -> dict[str, OpBenchEntry]:
    """The registry (name -> entry), after importing OP_BENCH_MODULES and `extra_modules`."""
    for module in (*OP_BENCH_MODULES, *extra_modules):
        if module not in _modules_loaded:
            importlib.import_module(module)
            _modules_loaded.add(module)
    return dict(_REGISTRY)


# ---------------------------------------------------------------- bytes and flops formulas


def kv_bytes(case_or_shape: OpCase | AttnShape, tokens: int, batch: int = 1, itemsize: int | None = None,
             keys: bool = True, values: bool = True) -> int:
    """Bytes of `tokens` cached tokens of K and/or V: B * Hk * tokens * D * itemsize each."""
    if isinstance(case_or_shape, OpCase):
        shape, batch, itemsize = case_or_shape.shape, case_or_shape.batch, case_or_shape.itemsize
    else:
        shape = case_or_shape
    if itemsize is None:
        raise ValueError("itemsize is required with an AttnShape")
    return (int(keys) + int(values)) * batch * shape.num_kv_heads * tokens * shape.head_dim * itemsize


def dense_bytes(shape: AttnShape, n: int, queries: int = 1, batch: int = 1, itemsize: int = 4) -> int:
    """Minimum bytes a dense step reads: all of K and V [B, Hk, N, D] once plus the queries
    [B, H, q, D] (the output write is not counted)."""
    return kv_bytes(shape, n, batch, itemsize) + batch * shape.num_heads * queries * shape.head_dim * itemsize


def dense_flops(shape: AttnShape, n: int, queries: int = 1, batch: int = 1) -> int:
    """Multiply-adds x2 of QK^T and PV for `queries` causal queries ending at position N - 1:
    query i (0-based in the chunk) sees N - queries + i + 1 keys."""
    keys_seen = queries * (n - queries) + queries * (queries + 1) // 2
    return 4 * batch * shape.num_heads * shape.head_dim * keys_seen


# ---------------------------------------------------------------- built-in impls


class _ModuleStub:
    """What HF's sdpa_attention_forward reads from an attention module."""

    def __init__(self, shape: AttnShape):
        self.num_key_value_groups = shape.groups
        self.is_causal = True
        self.training = False


def _dense_case_queries(case: OpCase) -> tuple[torch.Tensor, int] | None:
    if case.phase == "decode":
        return case.inputs.q, 1
    if case.phase == "prefill_chunk":
        return case.inputs.q_chunk, case.inputs.chunk
    return None  # hit / miss phases exist only for impls with a selection cache


def _dense_bench(case: OpCase, total: Callable[[], Any], queries: int) -> OpBench:
    nbytes = dense_bytes(case.shape, case.n, queries, case.batch, case.itemsize)
    flops = dense_flops(case.shape, case.n, queries, case.batch)
    return OpBench(parts={"total": total}, bytes_read={"total": nbytes}, flops={"total": flops})


def sdpa_setup(case: OpCase) -> OpBench | None:
    """torch SDPA with enable_gqa (no K/V repeat); the prefill chunk uses a lower-right causal
    bias (flash kernel on CUDA, a materialised [c, N] mask on CPU)."""
    found = _dense_case_queries(case)
    if found is None:
        return None
    q, queries = found
    x = case.inputs
    if queries == 1:
        total = lambda: F.scaled_dot_product_attention(q, x.k, x.v, enable_gqa=True)  # noqa: E731
    else:
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(queries, case.n)
        total = lambda: F.scaled_dot_product_attention(q, x.k, x.v, attn_mask=bias, enable_gqa=True)  # noqa: E731
    return _dense_bench(case, total, queries)


def dense_setup(case: OpCase) -> OpBench | None:
    """tokaccel's dense policy step (HF sdpa_attention_forward) with the mask a model would pass:
    none at decode, a 4-D bool [B, 1, c, N] causal mask for the prefill chunk (with a mask HF
    repeats K/V for GQA; that cost is part of what this row measures)."""
    from ..policies.dense import dense_attention

    found = _dense_case_queries(case)
    if found is None:
        return None
    q, queries = found
    x = case.inputs
    module = _ModuleStub(case.shape)
    mask = None if queries == 1 else x.chunk_mask[None, None].expand(case.batch, 1, -1, -1)
    total = lambda: dense_attention(module, q, x.k, x.v, mask)  # noqa: E731
    return _dense_bench(case, total, queries)


def flash_setup(case: OpCase) -> OpBench | None:
    """flash_attn_func (CUDA, fp16/bf16, flash-attn installed); K/V transposed to flash's
    [B, N, Hk, D] layout once, untimed; causal=True is bottom-right aligned (flash-attn >= 2.1)."""
    if case.device.type != "cuda" or case.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    found = _dense_case_queries(case)
    if found is None:
        return None
    q, queries = found
    q = q.transpose(1, 2).contiguous()  # [B, q, H, D]
    k = case.inputs.k.transpose(1, 2).contiguous()  # [B, N, Hk, D]
    v = case.inputs.v.transpose(1, 2).contiguous()
    total = lambda: flash_attn_func(q, k, v, causal=queries > 1)  # noqa: E731
    return _dense_bench(case, total, queries)


def gqa_matmul_setup(case: OpCase) -> OpBench | None:
    """Decode as two grouped matmuls, split into parts: the G query heads of a KV head are one
    [G, D] matrix (q viewed [B, Hk, G, D], head h -> KV head h // G), so K and V are each read
    once without repeat_kv. "score": logits [B, Hk, G, N] = q K^T * D^-0.5 (reads K);
    "attention": softmax and p V (reads V); "total": both. The decode reference a CPU kernel path
    should match; prefill chunks are not provided (the [c, N] logits would be materialised)."""
    if case.phase != "decode":
        return None
    x, shape = case.inputs, case.shape
    B, D = case.batch, shape.head_dim
    q = x.q.reshape(B, shape.num_kv_heads, shape.groups, D)
    scale = D ** -0.5

    def score():
        return torch.matmul(q, x.k.transpose(-1, -2)) * scale

    def attention(logits):
        return torch.matmul(torch.softmax(logits, dim=-1, dtype=torch.float32).to(x.v.dtype), x.v)

    logits = score()
    q_bytes = B * shape.num_heads * D * case.itemsize
    return OpBench(
        parts={"score": score, "attention": lambda: attention(logits), "total": lambda: attention(score())},
        bytes_read={"score": kv_bytes(case, case.n, values=False) + q_bytes,
                    "attention": kv_bytes(case, case.n, keys=False) + logits.numel() * logits.element_size(),
                    "total": dense_bytes(shape, case.n, 1, B, case.itemsize)},
        flops={"score": 2 * B * shape.num_heads * case.n * D, "attention": 2 * B * shape.num_heads * case.n * D,
               "total": dense_flops(shape, case.n, 1, B)},
    )


register_op_bench("sdpa", sdpa_setup, "torch scaled_dot_product_attention, enable_gqa (the baseline)")
register_op_bench("dense", dense_setup, "tokaccel dense policy: HF sdpa_attention_forward")
register_op_bench("flash", flash_setup, "flash_attn_func (CUDA, fp16/bf16, when installed)")
register_op_bench("gqa_matmul", gqa_matmul_setup, "decode as grouped matmul-softmax-matmul, split into parts")


# ---------------------------------------------------------------- the sweep


@dataclass
class OpsConfig:
    """What `run_ops` sweeps. `ns` None: the device's default sweep."""

    shapes: Sequence[str] = tuple(SHAPES)
    ns: Sequence[int] | None = None
    impls: Sequence[str] = ("sdpa", "dense", "flash", "gqa_matmul", "tokenselect")
    phases: Sequence[str] = ("decode", "decode_hit", "decode_miss", "prefill_chunk")
    batch: int = 1
    chunk: int = 512
    dtype: torch.dtype | None = None  # None: fp32 on CPU, bf16 on CUDA
    device: str = "cpu"
    warmup: int = 1  # untimed calls per callable; at least 1 runs (it also checks that the call works)
    repeats: int = 5
    prefill_max_n: int | None = None  # skip prefill_chunk above this N (CPU time budget)
    plugins: Sequence[str] = ()
    copy_bytes: int | None = None  # buffer size of the copy-bandwidth measurement

    def resolved(self) -> "OpsConfig":
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        ns = self.ns or (CUDA_SWEEP if device.type == "cuda" else CPU_SWEEP)
        dtype = self.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        warn_if_slow_dtype(dtype, device)
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown shape(s) {unknown}; valid: {sorted(SHAPES)}")
        bad = [p for p in self.phases if p not in PHASES]
        if bad:
            raise ValueError(f"unknown phase(s) {bad}; valid: {PHASES}")
        return OpsConfig(**{**self.__dict__, "ns": tuple(ns), "dtype": dtype, "device": str(device)})


def _phase_group(phase: str) -> str:
    return "prefill_chunk" if phase == "prefill_chunk" else "decode"


def settle_allocator(nbytes: int = 16 << 20) -> None:
    """Free one large CPU block, as a model process has done long before its decode steps.

    glibc malloc serves blocks above its mmap threshold (128 KiB at start) with fresh, page-faulting
    mmaps, and raises the threshold to the size of each such block freed (below 32 MiB), after
    which blocks come from the heap. A fresh bench process has not freed anything large yet, so its
    first case paid page faults on every multi-MiB temporary: TokenSelect's decode hit on the
    SmolLM2 shape at 4K measured 3.3-4.1 ms when first and 1.3-1.7 ms after any other case.
    """
    block = torch.empty(nbytes, dtype=torch.uint8)
    del block


def run_ops(config: OpsConfig, metadata: dict | None = None, progress: bool = False) -> list[dict]:
    """Run the sweep; one row per (shape, N, impl, phase, part). `metadata` (results.run_metadata)
    is copied into every row."""
    cfg = config.resolved()
    registry = op_benches(cfg.plugins)
    specs = [(impl, *parse_spec(impl)) for impl in dict.fromkeys([BASELINE, *cfg.impls])]
    missing = [name for _, name, _ in specs if name not in registry]
    if missing:
        raise ValueError(f"no op bench registered for {missing}; registered: {sorted(registry)}")
    device = torch.device(cfg.device)
    if device.type == "cpu":
        settle_allocator()
    copy_bw = copy_bandwidth(device, cfg.copy_bytes)
    rows = []
    cases = [(s, n) for s in cfg.shapes for n in cfg.ns]
    if progress:
        from tqdm import tqdm

        cases = tqdm(cases, desc="bench ops", unit="case")
    for shape_name, n in cases:
        shape = SHAPES[shape_name]
        inputs = OpInputs.random(shape, n, cfg.batch, cfg.chunk, cfg.dtype, device)
        for group in ("decode", "prefill_chunk"):
            phases = [p for p in cfg.phases if _phase_group(p) == group]
            if group == "prefill_chunk" and cfg.prefill_max_n is not None and n > cfg.prefill_max_n:
                phases = []
            if not phases:
                continue
            common = {**(metadata or {}), "shape": shape_name, "num_heads": shape.num_heads,
                      "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim, "n": n, "batch": cfg.batch,
                      "chunk": inputs.chunk if group == "prefill_chunk" else 1,
                      "dtype": str(cfg.dtype).replace("torch.", "")}
            benches: dict[tuple[str, str], OpBench] = {}
            failed: dict[tuple[str, str, str], str] = {}
            for spec, name, params in specs:
                for phase in ([group] if spec == BASELINE else phases):
                    case = OpCase(spec, params, shape, n, phase, cfg.batch, cfg.chunk, cfg.dtype, device, inputs)
                    bench = _attempt(lambda: registry[name].setup(case), (spec, phase, "total"), failed, device)
                    if bench is not None:
                        benches[(spec, phase)] = bench
            fns = {(spec, phase, part): fn for (spec, phase), b in benches.items() for part, fn in b.parts.items()}
            logger.info("%s N=%d %s: timing %d callables", shape_name, n, group, len(fns))
            for key, fn in list(fns.items()):  # one untimed call each (the first warm-up round)
                if _attempt(lambda: (fn(), synchronize(device)), key, failed, device) is None:
                    del fns[key]
            for (spec, phase, part), reason in failed.items():
                rows.append({**common, "impl": spec, "phase": phase, "part": part, "status": "failed", "reason": reason})
            if not fns:
                continue
            timings = time_interleaved(fns, device=device, warmup=max(0, cfg.warmup - 1), repeats=cfg.repeats)
            base = timings.get((BASELINE, group, "total"))
            for (spec, phase, part), timing in timings.items():
                bench = benches[(spec, phase)]
                nbytes = bench.bytes_read.get(part)
                flops = bench.flops.get(part)
                total = timings.get((spec, phase, "total"))
                row = {
                    **common, "impl": spec, "phase": phase, "part": part, "status": "ok", "reason": "",
                    "median_ms": timing.median_s * 1e3, "min_ms": timing.min_s * 1e3, "max_ms": timing.max_s * 1e3,
                    "repeats": timing.repeats, "warmup": timing.warmup + 1, "timer": timing.method,
                    "threads": timing.threads,
                    "bytes_read": nbytes,
                    "achieved_gbs": nbytes / timing.median_s / 1e9 if nbytes else None,
                    "copy_gbs": copy_bw / 1e9,
                    "bw_ratio": nbytes / timing.median_s / copy_bw if nbytes else None,
                    "flops": flops,
                    "tflops": flops / timing.median_s / 1e12 if flops else None,
                    "baseline": BASELINE,
                    "speedup": paired_ratio(base, timing) if part == "total" and base else None,
                    "part_share": timing.median_s / total.median_s if part != "total" and total else None,
                    **{f"info_{k}": v for k, v in bench.info.items()},
                }
                rows.append(row)
            del benches, fns, timings
        del inputs
        gc.collect()
        if is_cuda(device):
            torch.cuda.empty_cache()
    return rows


def _attempt(call: Callable[[], Any], key: tuple, failed: dict, device: torch.device):
    """`call()`, or None with `failed[key]` set to the reason when it raises (out of memory at a
    long N, a backend that cannot run this shape): one impl failing must not stop the sweep."""
    try:
        return call()
    except (RuntimeError, ValueError, NotImplementedError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        failed[key] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        logger.warning("%s failed, not timed: %s", key, failed[key])
        if is_cuda(device):
            torch.cuda.empty_cache()
        return None


def smoke_config(**overrides) -> OpsConfig:
    """Tiny sizes for CI: every shape at N=256, chunk 32, one untimed call, 1 repeat, small copy buffer,
    TokenSelect with a budget below N."""
    impls = ("sdpa", "dense", "flash", "gqa_matmul", "tokenselect:k=64,n_init=8,n_local=32,chunk=32")
    base = dict(ns=(256,), chunk=32, warmup=0, repeats=1, copy_bytes=8 * 2**20, impls=impls)
    return OpsConfig(**{**base, **overrides})


TABLE_COLUMNS = ("shape", "n", "impl", "phase", "part", "median_ms", "min_ms", "max_ms", "achieved_gbs", "bw_ratio",
                 "tflops", "speedup", "status")
TABLE_HEADERS = ("shape", "N", "impl", "phase", "part", "median ms", "min ms", "max ms", "GB/s", "of copy BW",
                 "TFLOP/s", "speedup vs sdpa", "status")
