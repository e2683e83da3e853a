"""Plots from benchmark CSVs (`tokaccel plot PATH`): latency vs context and speedup bars.

For each bench_ops.csv: `ops_latency*.png` (median time of each impl's whole step vs N, min-max
band, and the time a step reading its bytes at the measured copy bandwidth would take) and
`ops_speedup*.png` (speedup over the SDPA baseline per N). For each bench_e2e.csv:
`e2e_latency*.png` (TTFT and TPOT vs context per variant and batch) and `e2e_speedup*.png`
(TTFT / TPOT speedup over unpatched HF). When a CSV holds several runs of the same case, the
latest row wins. matplotlib is imported lazily with the Agg backend.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from .results import E2E_CSV, OPS_CSV, as_float, read_rows

logger = logging.getLogger(__name__)

OPS_KEY = ("device_name", "shape", "n", "batch", "chunk", "dtype", "impl", "phase", "part")
E2E_KEY = ("device_name", "model", "dtype", "context", "batch", "new_tokens", "variant")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latest(rows: list[dict], key: tuple[str, ...]) -> list[dict]:
    """One row per key, the last one written (rows are appended in time order)."""
    kept: dict[tuple, dict] = {}
    for row in rows:
        kept[tuple(row.get(k, "") for k in key)] = row
    return list(kept.values())


def _find(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.name in (OPS_CSV, E2E_CSV) else []
    if not path.is_dir():
        return []
    return sorted(p for name in (OPS_CSV, E2E_CSV) for p in path.rglob(name) if "plots" not in p.parts)


def plot_results(path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write PNGs for every bench CSV under `path` (a folder or one CSV) into `out_dir` (default
    PATH/plots, or the CSV's folder/plots); return their paths ([] when there is no bench CSV)."""
    path = Path(path)
    csvs = _find(path)
    if not csvs:
        return []
    root = path if path.is_dir() else path.parent
    out = Path(out_dir) if out_dir else root / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for csv_path in csvs:
        rel = csv_path.parent.relative_to(root) if csv_path.parent != root else None
        tag = "" if rel is None else "_" + "_".join(rel.parts)
        rows = read_rows(csv_path)
        if not rows:
            continue
        if csv_path.name == OPS_CSV:
            written += plot_ops(latest(rows, OPS_KEY), out, tag)
        else:
            written += plot_e2e(latest(rows, E2E_KEY), out, tag)
    return written


def _device_label(rows: list[dict]) -> str:
    names = sorted({r.get("device_name", "") for r in rows} - {""})
    threads = sorted({r.get("threads", "") for r in rows} - {""})
    label = ", ".join(names) or "unknown device"
    return f"{label}, {'/'.join(threads)} threads" if threads and rows[0].get("device") == "cpu" else label


def _n_label(n: float) -> str:
    n = int(n)
    return f"{n // 2**20}M" if n >= 2**20 and n % 2**20 == 0 else f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _colors(keys: list) -> dict:
    """The same colour for the same series in every panel and figure."""
    palette = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    return {key: palette[i % len(palette)] for i, key in enumerate(keys)}


def plot_ops(rows: list[dict], out: Path, tag: str = "") -> list[Path]:
    """Latency-vs-N (one panel per shape and phase group) and speedup bars over the baseline."""
    plt = _pyplot()
    totals = [r for r in rows if r.get("part") == "total"]
    if not totals:
        return []
    shapes = list(dict.fromkeys(r["shape"] for r in totals))
    colors = _colors(sorted({(r["impl"], r["phase"]) for r in totals}))
    groups = [g for g in ("decode", "prefill_chunk") if any((r["phase"] == "prefill_chunk") == (g == "prefill_chunk")
                                                                 for r in totals)]
    fig, axes = plt.subplots(len(groups), len(shapes), figsize=(4.2 * len(shapes), 3.6 * len(groups)), squeeze=False)
    for gi, group in enumerate(groups):
        for si, shape in enumerate(shapes):
            ax = axes[gi][si]
            sel = [r for r in totals if r["shape"] == shape and (r["phase"] == "prefill_chunk") == (group == "prefill_chunk")]
            lines = defaultdict(list)
            for r in sel:
                lines[(r["impl"], r["phase"])].append(r)
            for (impl, phase), pts in sorted(lines.items()):
                pts.sort(key=lambda r: as_float(r["n"]))
                x = [as_float(r["n"]) for r in pts]
                label = impl if phase in ("decode", "prefill_chunk") else f"{impl} ({phase.removeprefix('decode_')})"
                color = colors[(impl, phase)]
                ax.plot(x, [as_float(r["median_ms"]) for r in pts], marker="o", label=label, color=color)
                ax.fill_between(x, [as_float(r["min_ms"]) for r in pts], [as_float(r["max_ms"]) for r in pts], alpha=0.2,
                                color=color)
            base = sorted((r for r in sel if r["impl"] == r.get("baseline", "sdpa")), key=lambda r: as_float(r["n"]))
            if base and group == "decode":
                bound = [as_float(r["bytes_read"]) / (as_float(r["copy_gbs"]) * 1e9) * 1e3 for r in base]
                ax.plot([as_float(r["n"]) for r in base], bound, "k--", lw=1, label="bytes / copy BW")
            first = sel[0] if sel else {}
            ax.set_title(f"{shape} (H={first.get('num_heads')}, Hk={first.get('num_kv_heads')}, "
                         f"D={first.get('head_dim')})\n{'decode step' if group == 'decode' else 'prefill chunk'}",
                         fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("cached tokens N")
            ax.set_ylabel("ms per step")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Attention step latency vs context: {_device_label(totals)}", fontsize=10)
    fig.tight_layout()
    latency = out / f"ops_latency{tag}.png"
    fig.savefig(latency, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.4), squeeze=False)
    for si, shape in enumerate(shapes):
        ax = axes[0][si]
        sel = [r for r in totals if r["shape"] == shape and r["impl"] != r.get("baseline", "sdpa")]
        series = sorted({(r["impl"], r["phase"]) for r in sel})
        ns = sorted({as_float(r["n"]) for r in sel})
        width = 0.8 / max(1, len(series))
        for i, (impl, phase) in enumerate(series):
            by_n = {as_float(r["n"]): as_float(r["speedup"]) for r in sel if (r["impl"], r["phase"]) == (impl, phase)}
            ax.bar([j + i * width for j in range(len(ns))], [by_n.get(n, float("nan")) for n in ns], width,
                   label=f"{impl} {phase}", color=colors[(impl, phase)])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(ns))], [_n_label(n) for n in ns])
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("cached tokens N")
        ax.set_ylabel("speedup vs sdpa (x)")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room for the legend above the bars
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.suptitle(f"Speedup over SDPA (paired per repeat): {_device_label(totals)}", fontsize=10)
    fig.tight_layout()
    speedup = out / f"ops_speedup{tag}.png"
    fig.savefig(speedup, dpi=110)
    plt.close(fig)
    return [latency, speedup]


def plot_e2e(rows: list[dict], out: Path, tag: str = "") -> list[Path]:
    """TTFT / TPOT vs context per (variant, batch), and TTFT / TPOT speedup bars over "hf"."""
    plt = _pyplot()
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return []
    model = ", ".join(sorted({r.get("model", "") for r in ok}))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    lines = defaultdict(list)
    for r in ok:
        lines[(r["variant"], int(as_float(r["batch"])))].append(r)
    colors = _colors(list(dict.fromkeys(r["variant"] for r in ok)))
    for ax, metric, label in ((axes[0][0], "ttft_ms", "time to first token (ms)"),
                              (axes[0][1], "tpot_ms", "time per output token (ms)")):
        for (variant, batch), pts in sorted(lines.items()):
            pts.sort(key=lambda r: as_float(r["context"]))
            ax.plot([as_float(r["context"]) for r in pts], [as_float(r[metric]) for r in pts],
                    marker="o" if batch == 1 else "s", linestyle="-" if batch == 1 else "--", color=colors[variant],
                    label=f"{variant} (batch {batch})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{model}: end-to-end latency, {_device_label(ok)}", fontsize=10)
    fig.tight_layout()
    latency = out / f"e2e_latency{tag}.png"
    fig.savefig(latency, dpi=110)
    plt.close(fig)

    cand = [r for r in ok if r.get("kind") != "baseline"]
    cases = sorted({(int(as_float(r["context"])), int(as_float(r["batch"]))) for r in ok})
    variants = list(dict.fromkeys(r["variant"] for r in cand))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    width = 0.8 / max(1, len(variants))
    for ax, metric, label in ((axes[0][0], "speedup_ttft", "TTFT speedup vs hf (x)"),
                              (axes[0][1], "speedup_tpot", "TPOT speedup vs hf (x)")):
        for i, variant in enumerate(variants):
            by_case = {(int(as_float(r["context"])), int(as_float(r["batch"]))): as_float(r[metric])
                       for r in cand if r["variant"] == variant}
            ax.bar([j + i * width for j in range(len(cases))], [by_case.get(c, float("nan")) for c in cases], width,
                   label=variant, color=colors[variant])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.2)
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(cases))],
                      [f"{_n_label(n)}\nB={b}" for n, b in cases])
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.suptitle(f"{model}: speedup over unpatched HF generate (paired per repeat), {_device_label(ok)}", fontsize=10)
    fig.tight_layout()
    speedup = out / f"e2e_speedup{tag}.png"
    fig.savefig(speedup, dpi=110)
    plt.close(fig)
    return [latency, speedup]
