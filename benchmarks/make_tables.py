"""Summary tables (markdown) from the bench CSVs of a results folder.

    python benchmarks/make_tables.py benchmarks/results/cpu      # writes benchmarks/results/cpu/tables.md

One table per kind of result, the latest row of each case (plots.latest): decode steps (time per
impl with the paired speedup over SDPA, bytes read, the best achieved bandwidth and its ratio
to the measured copy bandwidth), prefill chunks (time and TFLOP/s) and end-to-end generate. Each
table is headed by the device, thread count, versions and the commands that produced it (read
from the CLI's bench_*.md logs).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tokaccel.bench.plots import E2E_KEY, OPS_KEY, latest
from tokaccel.bench.results import E2E_CSV, OPS_CSV, as_float, markdown_table, read_rows


def _ms(value: float) -> str:
    return "" if value != value else f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def _x(value: float) -> str:
    return "" if value != value else f"{value:.2f}x"


def _header(rows: list[dict], log: Path) -> str:
    first = rows[-1]
    commands = re.findall(r"^`(tokaccel bench .*)`$", log.read_text(), re.M) if log.exists() else []
    lines = [f"Measured on {first.get('device_name')} ({first.get('device')}), {first.get('threads')} threads, "
             f"torch {first.get('torch')}, transformers {first.get('transformers')}, "
             f"{first.get('timestamp', '')[:10]}, commit {first.get('git_commit') or 'uncommitted'}."]
    loads = sorted(as_float(r.get("load_1m")) for r in rows if as_float(r.get("load_1m")) == as_float(r.get("load_1m")))
    if loads and first.get("device") == "cpu":
        lines[0] += (f" 1-minute load average at the start of the runs: {loads[0]:.1f}-{loads[-1]:.1f} "
                     f"(other jobs on a shared machine inflate CPU times; ratios are paired per repeat).")
    if commands:
        lines += ["", "Reproduce with:", "", "```", *dict.fromkeys(commands), "```"]
    return "\n".join(lines)


def ops_tables(rows: list[dict]) -> list[str]:
    rows = [r for r in latest(rows, OPS_KEY) if r.get("status", "ok") == "ok" and r["part"] == "total"]
    out = []
    copy = sorted({round(as_float(r["copy_gbs"]), 1) for r in rows})
    decode = [r for r in rows if r["phase"] == "decode"]
    if decode:
        impls = list(dict.fromkeys(r["impl"] for r in decode))
        table = []
        for shape, n in dict.fromkeys((r["shape"], r["n"]) for r in decode):
            case = {r["impl"]: r for r in decode if (r["shape"], r["n"]) == (shape, n)}
            best = max(case.values(), key=lambda r: as_float(r["achieved_gbs"]))
            row = {"shape": shape, "N": f"{int(n) // 1024}K", "KV read MiB": f"{as_float(best['bytes_read']) / 2**20:.1f}"}
            for impl in impls:
                r = case.get(impl)
                row[f"{impl} ms"] = "" if r is None else (
                    _ms(as_float(r["median_ms"])) + ("" if impl == r["baseline"] else f" ({_x(as_float(r['speedup']))})"))
            row["best GB/s"] = f"{as_float(best['achieved_gbs']):.1f} ({best['impl']})"
            row["of copy BW"] = f"{as_float(best['bw_ratio']):.2f}"
            table.append(row)
        out.append(f"**Decode step** (one query token, one layer, batch 1; median ms, paired speedup vs sdpa in "
                   f"parentheses; copy bandwidth measured {'/'.join(map(str, copy))} GB/s, read + write)\n\n"
                   + markdown_table(table, list(table[0])))
    prefill = [r for r in rows if r["phase"] == "prefill_chunk"]
    if prefill:
        impls = list(dict.fromkeys(r["impl"] for r in prefill))
        table = []
        for shape, n in dict.fromkeys((r["shape"], r["n"]) for r in prefill):
            case = {r["impl"]: r for r in prefill if (r["shape"], r["n"]) == (shape, n)}
            row = {"shape": shape, "N": f"{int(n) // 1024}K", "chunk": next(iter(case.values()))["chunk"]}
            for impl in impls:
                r = case.get(impl)
                row[f"{impl} ms"] = "" if r is None else (
                    _ms(as_float(r["median_ms"])) + ("" if impl == r["baseline"] else f" ({_x(as_float(r['speedup']))})"))
                row[f"{impl} TFLOP/s"] = "" if r is None else f"{as_float(r['tflops']):.3f}"
            table.append(row)
        out.append("**Prefill chunk** (the last c queries of an N-token prompt attend causally to all N; median ms, "
                   "paired speedup vs sdpa)\n\n" + markdown_table(table, list(table[0])))
    return out


def e2e_tables(rows: list[dict]) -> list[str]:
    rows = latest(rows, E2E_KEY)
    model = ", ".join(dict.fromkeys(r["model"] for r in rows))
    table = []
    for r in rows:
        ok = r["status"] == "ok"
        table.append({
            "context": r["context"], "batch": r["batch"], "variant": r["variant"],
            "TTFT ms": _ms(as_float(r.get("ttft_ms"))) if ok else "",
            "TPOT ms": _ms(as_float(r.get("tpot_ms"))) if ok else "",
            "tokens/s": f"{as_float(r.get('tokens_per_s')):.2f}" if ok else "",
            "peak mem MiB": f"{as_float(r.get('peak_mem_mb')):.0f}" if ok else "",
            "KV MiB": f"{as_float(r.get('kv_mb')):.1f}" if ok else "",
            "agree w/ hf": f"{as_float(r.get('agree_with_hf')):.2f}" if ok else "",
            "TTFT x": _x(as_float(r.get("speedup_ttft"))) if ok else "",
            "TPOT x": _x(as_float(r.get("speedup_tpot"))) if ok else "",
            "repeats": r.get("repeats", "") if ok else "",
            "note": "" if ok else f"skipped: {r.get('reason', '')}",
        })
    return [f"**End to end, {model}** (greedy generate of {rows[0]['new_tokens']} tokens; TTFT / TPOT medians, "
            "tokens/s over the whole call, peak memory = growth of sampled RSS, KV after generation; speedups "
            "paired per repeat vs unpatched HF)\n\n" + markdown_table(table, list(table[0]))]


def make_tables(folder: str | Path) -> Path:
    folder = Path(folder)
    parts = [f"# Benchmark tables: {folder}"]
    for name, render in ((OPS_CSV, ops_tables), (E2E_CSV, e2e_tables)):
        path = folder / name
        if path.exists():
            rows = read_rows(path)
            if rows:
                parts += [_header(rows, path.with_suffix(".md")), *render(rows)]
    out = folder / "tables.md"
    out.write_text("\n\n".join(parts) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="folder holding bench_ops.csv and/or bench_e2e.csv")
    print(make_tables(parser.parse_args(argv).folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
