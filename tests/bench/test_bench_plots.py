"""Plots from bench CSVs (written by append_rows, as the CLI does)."""

from tokaccel.bench.plots import plot_results
from tokaccel.bench.results import append_rows

PNG = b"\x89PNG"


def _ops_rows():
    rows = []
    for n in (256, 1024):
        for impl, speed in (("sdpa", 1.0), ("dense", 0.9)):
            for phase in ("decode", "prefill_chunk"):
                rows.append(dict(device="cpu", device_name="cpu x", threads=2, shape="smollm2", num_heads=9,
                                 num_kv_heads=3, head_dim=64, n=n, batch=1, chunk=1, dtype="float32", impl=impl,
                                 phase=phase, part="total", median_ms=n / 100, min_ms=n / 120, max_ms=n / 80,
                                 bytes_read=n * 1536, copy_gbs=20.0, baseline="sdpa", speedup=speed))
    return rows


def _e2e_rows():
    rows = []
    for n in (64, 128):
        for variant, kind in (("hf", "baseline"), ("dense", "policy"), ("prompt_lookup", "peer")):
            rows.append(dict(device="cpu", device_name="cpu x", threads=2, model="m", dtype="float32", context=n,
                             batch=1, new_tokens=4, variant=variant, kind=kind, status="ok", ttft_ms=n, tpot_ms=10,
                             speedup_ttft=1.0, speedup_tpot=1.1))
        rows.append(dict(model="m", context=n, batch=2, variant="prompt_lookup", kind="peer", status="skipped",
                         reason="batch 1 only"))
    return rows


def test_plots_from_csvs(tmp_path):
    append_rows(tmp_path / "cpu" / "bench_ops.csv", _ops_rows())
    append_rows(tmp_path / "cpu" / "bench_e2e.csv", _e2e_rows())
    written = plot_results(tmp_path)
    assert sorted(p.name for p in written) == ["e2e_latency_cpu.png", "e2e_speedup_cpu.png", "ops_latency_cpu.png",
                                               "ops_speedup_cpu.png"]
    assert all(p.parent == tmp_path / "plots" and p.read_bytes()[:4] == PNG for p in written)
    one = plot_results(tmp_path / "cpu" / "bench_ops.csv", out_dir=tmp_path / "elsewhere")
    assert [p.name for p in one] == ["ops_latency.png", "ops_speedup.png"]


def test_no_csv_no_plots(tmp_path):
    (tmp_path / "other.csv").write_text("a\n1\n")
    assert plot_results(tmp_path) == [] and plot_results(tmp_path / "missing") == []


def test_summary_tables_script(tmp_path):
    """benchmarks/make_tables.py renders the bench tables from the CSVs."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "make_tables.py"
    spec = importlib.util.spec_from_file_location("make_tables", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ops = _ops_rows()
    for r in ops:
        r.update(achieved_gbs=1.0, bw_ratio=0.05, tflops=0.1, run_id="a", timestamp="T1")
    selection = [dict(ops[0], run_id="b", timestamp="T2", impl=impl, phase=phase, part=part, median_ms=ms, speedup=x)
                 for impl, phase, part, ms, x in (("sdpa", "decode", "total", 4.0, 1.0),
                                                  ("tokenselect", "decode_hit", "total", 1.0, 4.0),
                                                  ("tokenselect", "decode_miss", "score", 2.5, ""),
                                                  ("tokenselect", "decode_miss", "total", 3.0, 1.3))]
    append_rows(tmp_path / "bench_ops.csv", ops + selection)
    append_rows(tmp_path / "bench_e2e.csv", _e2e_rows())
    (tmp_path / "bench_ops.md").write_text("### T1 cpu x\n\n`tokaccel bench ops --smoke`\n\n| table |\n\n"
                                           "### T2 cpu x\n\n`tokaccel bench ops --impls sdpa,tokenselect`\n")
    text = module.make_tables(tmp_path).read_text()
    assert "tokaccel bench ops --smoke" in text and "**Decode step**" in text and "**Prefill chunk**" in text
    assert "| smollm2 | 1K |" in text and "skipped: batch 1 only" in text
    # one section per run, each under its own command, ratios against its own baseline
    second = text[text.index("tokaccel bench ops --impls sdpa,tokenselect"):]
    assert "tokaccel bench ops --smoke" not in second
    assert "| shape | N | sdpa ms | tokenselect hit ms | tokenselect miss ms | tokenselect miss parts ms |" in second
    assert "| smollm2 | 256 | 4 | 1 (4.00x) | 3 (1.30x) | score 2.5 |" in second
