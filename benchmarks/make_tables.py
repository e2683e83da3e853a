"""Summary tables (markdown) from the bench CSVs of a results folder.

    python benchmarks/make_tables.py benchmarks/results/cpu      # writes benchmarks/results/cpu/tables.md

One section per run (one CLI call), so every ratio is read against the baseline measured in
the same run: decode steps (time per impl and phase with the paired speedup over SDPA, the parts
of a selection miss, the best achieved bandwidth and its ratio to the measured copy bandwidth),
prefill chunks (time and TFLOP/s) and end-to-end generate. Each section is headed by the device,
thread count, versions, load average and the command that produced it (read from the CLI's
bench_*.md logs).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tokaccel.bench.results import E2E_CSV, OPS_CSV, as_float, markdown_table, read_rows


def _ms(value: float) -> str:
    return "" if value != value else f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def _tokens(n) -> str:
    n = int(n)
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _x(value: float) -> str:
    return "" if value != value else f"{value:.2f}x"


def _commands(log: Path) -> dict[str, str]:
    """{run timestamp: command} from a CLI bench_*.md log ("### <timestamp> ..." then "`tokaccel bench ...`")."""
    text = log.read_text() if log.exists() else ""
    return dict(re.findall(r"^### (\S+) .*\n\n`(tokaccel bench .*)`$", text, re.M))


def _commit(row: dict) -> str:
    """The row's commit and whether the checkout was clean (rows from uncommitted code are never shown as clean)."""
    if not row.get("git_commit"):
        return "not recorded"
    dirty = str(row.get("git_dirty")).lower() == "true"
    return f"{row['git_commit'][:10]} ({'uncommitted code' if dirty else 'clean'})"


def _header(rows: list[dict], command: str | None) -> str:
    first = rows[0]
    line = (f"Measured on {first.get('device_name')} ({first.get('device')}), {first.get('threads')} threads, "
            f"torch {first.get('torch')}, transformers {first.get('transformers')}, "
            f"{first.get('timestamp', '')[:16].replace('T', ' ')}, commit {_commit(first)}")
    load = as_float(first.get("load_1m"))
    if load == load and first.get("device") == "cpu":
        line += f", 1-minute load average {load:.1f} at the start"
    return line + (f".\n\n```\n{command}\n```" if command else ".")


def _phase_column(impl: str, phase: str) -> str:
    return impl if phase in ("decode", "prefill_chunk") else f"{impl} {phase.removeprefix('decode_')}"


def _time_cell(r: dict | None) -> str:
    if r is None:
        return ""
    return _ms(as_float(r["median_ms"])) + ("" if r["impl"] == r["baseline"] else f" ({_x(as_float(r['speedup']))})")


def ops_tables(rows: list[dict]) -> list[str]:
    """Tables of one `bench ops` run: decode phases (decode, decode_hit, decode_miss) and prefill chunks."""
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    totals = [r for r in ok if r["part"] == "total"]
    out = []
    decode = [r for r in totals if r["phase"].startswith("decode")]
    if decode:
        columns = list(dict.fromkeys((r["impl"], r["phase"]) for r in decode))
        split = list(dict.fromkeys((r["impl"], r["phase"]) for r in ok
                                   if r["phase"] == "decode_miss" and r["part"] != "total"))
        table = []
        for shape, n in dict.fromkeys((r["shape"], r["n"]) for r in decode):
            case = {(r["impl"], r["phase"]): r for r in decode if (r["shape"], r["n"]) == (shape, n)}
            best = max(case.values(), key=lambda r: as_float(r["achieved_gbs"]))
            row = {"shape": shape, "N": _tokens(n)}
            row.update({f"{_phase_column(*c)} ms": _time_cell(case.get(c)) for c in columns})
            for impl, phase in split:
                parts = [r for r in ok if (r["impl"], r["phase"], r["shape"], r["n"]) == (impl, phase, shape, n)
                         and r["part"] != "total"]
                row[f"{impl} miss parts ms"] = ", ".join(f"{r['part']} {_ms(as_float(r['median_ms']))}" for r in parts)
            row["best GB/s"] = f"{as_float(best['achieved_gbs']):.1f} ({_phase_column(best['impl'], best['phase'])})"
            row["of copy BW"] = f"{as_float(best['bw_ratio']):.2f}"
            table.append(row)
        copy = sorted({round(as_float(r["copy_gbs"]), 1) for r in decode})
        out.append(f"**Decode step** (one query token, one layer, batch {decode[0]['batch']}; median ms, paired "
                   f"speedup vs sdpa in parentheses; hit / miss: a step that reuses / renews the selection; copy "
                   f"bandwidth measured {'/'.join(map(str, copy))} GB/s, read + write)\n\n"
                   + markdown_table(table, list(table[0])))
    prefill = [r for r in totals if r["phase"] == "prefill_chunk"]
    if prefill:
        impls = list(dict.fromkeys(r["impl"] for r in prefill))
        table = []
        for shape, n in dict.fromkeys((r["shape"], r["n"]) for r in prefill):
            case = {r["impl"]: r for r in prefill if (r["shape"], r["n"]) == (shape, n)}
            row = {"shape": shape, "N": _tokens(n), "chunk": next(iter(case.values()))["chunk"]}
            for impl in impls:
                r = case.get(impl)
                row[f"{impl} ms"] = _time_cell(r)
                row[f"{impl} TFLOP/s"] = "" if r is None else f"{as_float(r['tflops']):.3f}"
            table.append(row)
        out.append("**Prefill chunk** (the last c queries of an N-token prompt attend causally to all N; median ms, "
                   "paired speedup vs sdpa)\n\n" + markdown_table(table, list(table[0])))
    return out


def e2e_tables(rows: list[dict]) -> list[str]:
    """The table of one `bench e2e` run."""
    table = []
    for r in rows:
        ok = r["status"] == "ok"
        hit_rate = as_float(r.get("selection_hit_rate"))
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
            "hit rate": f"{hit_rate:.2f}" if ok and hit_rate == hit_rate else "",
            "note": "" if ok else f"skipped: {r.get('reason', '')}",
        })
    return [f"**End to end, {rows[0]['model']}** (greedy generate of {rows[0]['new_tokens']} tokens; TTFT / TPOT "
            f"medians of {rows[0].get('repeats', '?')} repeats, tokens/s over the whole call, peak memory = growth of "
            "sampled RSS, KV after generation; speedups paired per repeat vs unpatched HF; hit rate: selection-cache "
            "hits per lookup)\n\n" + markdown_table(table, list(table[0]))]


def make_tables(folder: str | Path) -> Path:
    """tables.md: for every run in the folder's CSVs (oldest first), its header, command and tables."""
    folder = Path(folder)
    parts = [f"# Benchmark tables: {folder}"]
    for name, render in ((OPS_CSV, ops_tables), (E2E_CSV, e2e_tables)):
        path = folder / name
        rows = read_rows(path) if path.exists() else []
        commands = _commands(path.with_suffix(".md"))
        runs: dict[str, list[dict]] = {}
        for row in rows:
            runs.setdefault(row.get("run_id", ""), []).append(row)
        for run in runs.values():
            parts += [_header(run, commands.get(run[0].get("timestamp"))), *render(run)]
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
