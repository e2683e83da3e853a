"""Timers and the device's copy bandwidth.

CPU: warm-up calls, then `repeats` calls timed with `time.perf_counter`; the median is the
result, min and max come with it, and `torch.get_num_threads()` is recorded.
CUDA: every call is timed with CUDA events after a `torch.cuda.synchronize()`. `time_fn` on
CUDA is `triton.testing.do_bench` itself.
Caches are flushed before each timed call (outside the timed region) by writing a buffer larger
than the last-level cache (256 MiB on CUDA, as do_bench does for L2; 64 MiB on CPU for L3): in a
model, the other layers evict one layer's K/V between its steps, and a small K/V that stays in
cache would be reported at an impossible bandwidth. `flush=False` turns this off.

Baselines are timed in the same process and *interleaved* with the candidates
(`time_interleaved`: A B C, B C A, C A B, ... one call of each per repeat, the order rotated), and
ratios are taken per repeat (`paired_ratio`), so a shared, noisy machine slows both sides of a
ratio alike.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

# Bytes written before each timed call to evict the last-level cache (H100: 50 MB L2, do_bench
# uses 256 MB; server CPUs: 32 MB of L3 per core complex).
FLUSH_BYTES = {"cuda": 256 * 2**20, "cpu": 64 * 2**20}


@dataclass
class Timing:
    """Seconds per call over `repeats` timed calls (after `warmup` untimed ones)."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int
    warmup: int
    threads: int
    method: str  # "cpu-perf_counter" | "cuda-events" | "cuda-do_bench"
    samples: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_samples(cls, samples: list[float], warmup: int, method: str) -> "Timing":
        return cls(
            median_s=statistics.median(samples),
            min_s=min(samples),
            max_s=max(samples),
            repeats=len(samples),
            warmup=warmup,
            threads=torch.get_num_threads(),
            method=method,
            samples=list(samples),
        )


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: str | torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


class _CallTimer:
    """Times one call of `fn` on `device`: perf_counter on CPU, CUDA events on GPU; the cache is
    flushed first when `flush`."""

    def __init__(self, device: str | torch.device, flush: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        nbytes = FLUSH_BYTES.get(self.device.type, FLUSH_BYTES["cpu"])
        self._flush = torch.empty(nbytes // 4, dtype=torch.int32, device=self.device) if flush else None

    @property
    def method(self) -> str:
        return "cuda-events" if self.cuda else "cpu-perf_counter"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self._flush is not None:
            self._flush.zero_()  # evict the last-level cache, outside the timed region
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(self.device)
        return start.elapsed_time(end) / 1e3  # ms -> s


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeats: int = 5,
    flush: bool = True,
) -> dict[str, Timing]:
    """Time several callables interleaved: in repeat r every callable runs once, in an order
    rotated by r (A B C, B C A, C A B, ...), so slow phases of a shared machine hit all of them.

    Returns name -> Timing; `Timing.samples[r]` of different names come from the same repeat r,
    which is what `paired_ratio` relies on. Warm-up calls are interleaved the same way.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    timer = _CallTimer(device, flush)
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    synchronize(device)
    for i in range(warmup + repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = timer(fns[name])
            if i >= warmup:
                samples[name].append(elapsed)
    return {name: Timing.from_samples(samples[name], warmup, timer.method) for name in names}


def time_fn(
    fn: Callable[[], Any],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeats: int = 5,
    flush: bool = True,
) -> Timing:
    """Time one callable. CPU: warm-up + `repeats` perf_counter samples. CUDA:
    `triton.testing.do_bench` (CUDA events, L2 flushed; warm-up/rep in milliseconds, 25/100),
    reporting its median, min and max."""
    if not is_cuda(device):
        return time_interleaved({"fn": fn}, device=device, warmup=warmup, repeats=repeats, flush=flush)["fn"]
    from triton.testing import do_bench

    lo, med, hi = do_bench(fn, warmup=25, rep=100, quantiles=[0.0, 0.5, 1.0])  # milliseconds
    return Timing(med / 1e3, lo / 1e3, hi / 1e3, repeats=0, warmup=0, threads=torch.get_num_threads(),
                  method="cuda-do_bench", samples=[])


def paired_ratio(baseline: Timing, candidate: Timing) -> float:
    """Median over repeats of baseline_r / candidate_r (> 1: the candidate is faster). Falls back to
    the ratio of medians when the timings are not paired (different lengths, e.g. do_bench)."""
    if baseline.samples and len(baseline.samples) == len(candidate.samples):
        return statistics.median(b / c for b, c in zip(baseline.samples, candidate.samples) if c > 0)
    return baseline.median_s / candidate.median_s


def copy_bandwidth(device: str | torch.device = "cpu", nbytes: int | None = None, repeats: int = 7) -> float:
    """The device's measured memory bandwidth in bytes/s: `dst.copy_(src)` of a large preallocated
    buffer (256 MiB on CPU, 1 GiB on CUDA), median of `repeats`, counting read + write bytes
    (2 x nbytes, the STREAM "copy" convention). A memory-bound decode step can at best read at
    about this rate."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (2**30) if device.type == "cuda" else 256 * 2**20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timer = _CallTimer(device)
    dst.copy_(src)  # first touch: page faults outside the timed region
    synchronize(device)
    samples = [timer(lambda: dst.copy_(src)) for _ in range(repeats)]
    bandwidth = 2 * src.numel() * src.element_size() / statistics.median(samples)
    logger.info("copy bandwidth on %s: %.1f GB/s", device, bandwidth / 1e9)
    return bandwidth


class PeakMemory:
    """Peak memory growth during a `with` block, in bytes (`.peak_delta`).

    CUDA: `torch.cuda.max_memory_allocated` minus the allocation at entry. CPU: the process RSS
    sampled every `interval` s in a background thread (psutil when installed, else
    /proc/self/statm), peak minus RSS at entry. `resource.getrusage` is not used: its max RSS is
    a lifetime high-water mark, so it cannot see a block that stays below an earlier peak. Memory
    freed earlier but kept by the C allocator is handed back first (glibc `malloc_trim`), else
    a block that reuses it would show no growth.
    """

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_delta = 0
        self.method = "cuda-max_allocated" if self.device.type == "cuda" else "rss-sampled"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        import threading

        release_freed_memory()
        self._start = self._peak = rss_bytes()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, rss_bytes())

        self._thread = threading.Thread(target=sample, name="tokaccel-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_delta = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.peak_delta = self._peak - self._start


def release_freed_memory() -> None:
    """Return the C heap's free pages to the OS (glibc's `malloc_trim(0)`; no-op elsewhere)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    """Resident set size of this process in bytes."""
    global _process
    if _process is None:
        try:
            import psutil

            _process = psutil.Process()
        except ImportError:
            _process = False
    if _process:
        return _process.memory_info().rss
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_process = None  # psutil.Process of this process, False when psutil is not installed
