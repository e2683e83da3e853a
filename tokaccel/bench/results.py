"""Benchmark results as data: rows appended to CSV, each with where and when it was measured.

Every row carries `run_metadata()`: run id, UTC timestamp, device and its name, thread count,
versions (python, torch, transformers, triton, tokaccel) and the git commit of the tokaccel
checkout. `append_rows` writes the header once; a row with new columns rewrites the file with
the union of the columns, so old rows stay readable.
"""

from __future__ import annotations

import csv
import datetime
import functools
import importlib.metadata
import logging
import math
import os
import platform
import subprocess
import uuid
from pathlib import Path
from typing import Iterable, Sequence

import torch

logger = logging.getLogger(__name__)

OPS_CSV = "bench_ops.csv"
E2E_CSV = "bench_e2e.csv"
SPEC_CSV = "bench_spec.csv"
VISION_CSV = "bench_vision.csv"
METADATA_COLUMNS = (
    "run_id", "timestamp", "device", "device_name", "threads", "python", "torch", "transformers",
    "triton", "tokaccel", "git_commit", "git_dirty",
)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


@functools.lru_cache(maxsize=1)
def git_commit() -> tuple[str, bool]:
    """(commit of the checkout tokaccel is imported from, whether it has uncommitted changes);
    ("", False) outside a git checkout or before the first commit."""
    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "-q", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        commit = done.stdout.strip()
        if done.returncode or len(commit) != 40:
            return "", False
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return "", False


def device_name(device: str | torch.device) -> str:
    """GPU name on CUDA; the CPU model (and core count) otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def run_metadata(device: str | torch.device) -> dict:
    """The columns every row of one run shares (see METADATA_COLUMNS)."""
    commit, dirty = git_commit()
    return {
        "run_id": uuid.uuid4().hex[:12],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.device(device).type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "tokaccel": _version("tokaccel"),
        "git_commit": commit,
        "git_dirty": dirty,
        # other processes competing for the CPU at the start (a shared machine inflates CPU timings)
        "load_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def append_rows(path: str | Path, rows: Sequence[dict]) -> Path:
    """Append `rows` (dicts) to the CSV at `path`, writing the header once. Returns the path."""
    path = Path(path)
    if not rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    existing: list[str] = []
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            existing = next(csv.reader(f), [])
    if existing and not set(columns) <= set(existing):
        old = read_rows(path)
        merged = list(dict.fromkeys(existing + columns))
        _write(path, merged, old + list(rows), mode="w")
    else:
        _write(path, existing or columns, rows, mode="a" if existing else "w")
    return path


def _write(path: Path, columns: list[str], rows: Iterable[dict], mode: str) -> None:
    with path.open(mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if mode == "w":
            writer.writeheader()
        for row in rows:
            writer.writerow({key: _format(row.get(key)) for key in columns})


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a results CSV as dicts of strings (numbers parsed by the caller, see `as_float`)."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def as_float(value) -> float:
    """A CSV cell as float; NaN for empty or non-numeric cells."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of `columns` of `rows`; floats get 3 significant digits."""

    def cell(value) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.3g}"
        return "" if value is None else str(value)

    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
