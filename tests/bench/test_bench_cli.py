"""The bench commands in smoke mode, as CI runs them: CSV with metadata, markdown table, plots."""

import importlib

import pytest
import torch

from tokaccel.bench import cli
from tokaccel.bench.plots import plot_results
from tokaccel.bench.results import METADATA_COLUMNS, read_rows


def test_parse_sizes_and_specs():
    assert cli.parse_size("4K") == 4096 and cli.parse_size("1M") == 2**20 and cli.parse_size("1000") == 1000
    assert cli._names("dense, tokenselect:k=1024,theta=0.9,quest:page=16") == [
        "dense", "tokenselect:k=1024,theta=0.9", "quest:page=16"]


def test_bench_ops_smoke(tmp_path, capsys):
    assert cli.main(["bench", "ops", "--smoke", "--shapes", "smollm2", "--out", str(tmp_path), "--no-progress"]) == 0
    rows = read_rows(tmp_path / "bench_ops.csv")
    # sdpa and dense: decode + prefill_chunk; gqa_matmul: decode score / attention / total;
    # tokenselect: decode_hit attention / total, decode_miss + 2 more parts, prefill_chunk the same 4
    assert len(rows) == 7 + 2 + 4 + 4 and set(METADATA_COLUMNS) <= set(rows[0]) and rows[0]["device"] == "cpu"
    assert rows[0]["timestamp"] and rows[0]["torch"] and rows[0]["threads"]
    markdown = (tmp_path / "bench_ops.md").read_text()
    assert "`tokaccel bench ops --shapes smollm2 --n 256" in markdown and "| smollm2 | 256 | sdpa |" in markdown
    assert "| decode_hit | total |" in markdown
    assert "| shape | N |" in capsys.readouterr().out
    cli.main(["bench", "ops", "--smoke", "--shapes", "smollm2", "--out", str(tmp_path), "--no-progress"])
    assert len(read_rows(tmp_path / "bench_ops.csv")) == 34  # appended, header once
    assert [p.name for p in plot_results(tmp_path)] == ["ops_latency.png", "ops_speedup.png"]


def test_bench_e2e_smoke(tmp_path):
    argv = ["bench", "e2e", "--smoke", "--model", "tiny-random-llama", "--peers", "none", "--out", str(tmp_path),
            "--no-progress"]
    assert cli.main(argv) == 0
    rows = read_rows(tmp_path / "bench_e2e.csv")
    assert [(r["batch"], r["variant"], r["status"]) for r in rows] == [
        ("1", "hf", "ok"), ("1", "dense", "ok"), ("2", "hf", "ok"), ("2", "dense", "ok")]
    assert set(METADATA_COLUMNS) <= set(rows[0])
    assert "--peers none" in (tmp_path / "bench_e2e.md").read_text()


def test_bench_e2e_with_packed_linears(tmp_path, monkeypatch):
    """--pack-linears: every variant runs on the packed model (the generate calls see PackedLinear
    layers), the rows say so, tokens agree with the baseline, and the model is unpacked after."""
    from tokaccel.bench import e2e
    from tokaccel.cpu_linear import packed_count

    model, tokenizer = e2e.load_model(e2e.TINY_MODEL, "cpu", torch.float32)
    seen = []
    real = e2e.generate_once
    monkeypatch.setattr(e2e, "generate_once", lambda m, *a, **k: seen.append(packed_count(m)) or real(m, *a, **k))
    config = e2e.smoke_config(model=e2e.TINY_MODEL, peers=(), pack_linears=True)
    rows = e2e.run_e2e(config, model_and_tokenizer=(model, tokenizer))
    assert seen and set(seen) == {2 * 7 + 1} and packed_count(model) == 0
    assert all(r["status"] == "ok" and r["packed_linears"] and r["agree_with_hf"] == 1.0 for r in rows)


def test_bench_spec_smoke(tmp_path, monkeypatch):
    """Greedy vs Token Recycling vs prompt lookup on the tiny model: one prompt per class, every
    variant token-identical to greedy, summary rows per class and overall."""
    monkeypatch.setenv("TOKACCEL_CACHE", str(tmp_path / "cache"))
    assert cli.main(["bench", "spec", "--smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    rows = read_rows(tmp_path / "bench_spec.csv")
    per_prompt = [r for r in rows if r["prompt"] != "all"]
    assert len(per_prompt) == 4 * 3 and {r["variant"] for r in rows} == {"greedy", "recycling", "prompt_lookup"}
    assert all(r["identical"] == "True" for r in per_prompt)
    summary = {(r["class"], r["variant"]) for r in rows if r["prompt"] == "all"}
    assert ("all", "recycling") in summary and ("repetitive", "prompt_lookup") in summary
    assert set(METADATA_COLUMNS) <= set(rows[0])
    assert "`tokaccel bench spec --model tiny-random-llama" in (tmp_path / "bench_spec.md").read_text()


def test_bench_spec_with_packed_linears(tmp_path, monkeypatch):
    """--pack-linears packs every variant (baseline included), packed=0 opts one out, every output
    still equals greedy's; bad variant options are refused."""
    from tokaccel.bench.speculative import _variant_kwargs

    monkeypatch.setenv("TOKACCEL_CACHE", str(tmp_path / "cache"))
    argv = ["bench", "spec", "--smoke", "--pack-linears", "--variants", "recycling,greedy:packed=0",
            "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    rows = read_rows(tmp_path / "bench_spec.csv")
    assert {r["variant"] for r in rows} == {"greedy", "recycling", "greedy:packed=0"}
    assert all(r["packed_linears"] == "True" and r["identical"] in ("True", "1.0") for r in rows)
    assert "--pack-linears" in (tmp_path / "bench_spec.md").read_text()
    assert _variant_kwargs("recycling:tree=8,packed=0", True)[2] is False
    assert _variant_kwargs("prompt_lookup", True)[2] is True
    for spec, match in [("greedy", "only with an option"), ("recycling:n=3", "unknown option"),
                        ("greedy:packed=2", "packed must be 0 or 1")]:
        with pytest.raises(ValueError, match=match):
            _variant_kwargs(spec, False)


def test_bench_vision_smoke(tmp_path):
    """Prefill of a small random LLaVA per vision policy and keep ratio: rows with FLOPs that drop
    with the tokens kept, a table headed by the command."""
    argv = ["bench", "vision", "--smoke", "--keeps", "1.0,0.25", "--methods", "divprune,fastv", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    rows = read_rows(tmp_path / "bench_vision.csv")
    by = {(r["method"], float(r["keep"])): r for r in rows}
    assert set(by) == {("dense", 1.0), ("divprune", 1.0), ("divprune", 0.25), ("fastv", 1.0), ("fastv", 0.25)}
    assert float(by[("divprune", 1.0)]["flops_ratio"]) == 1.0 and by[("divprune", 0.25)]["image_tokens"] == "9"
    assert float(by[("divprune", 0.25)]["flops_ratio"]) < float(by[("fastv", 0.25)]["flops_ratio"]) < 1.0
    assert set(METADATA_COLUMNS) <= set(rows[0])
    assert "`tokaccel bench vision --keeps 1.0,0.25" in (tmp_path / "bench_vision.md").read_text()
    with pytest.raises(SystemExit, match="--keeps"):
        cli.main(["bench", "vision", "--smoke", "--keeps", "0", "--out", str(tmp_path)])


def test_spec_prompt_set():
    from tokaccel.bench.spec_prompts import PROMPTS, WARMUP, prompt_set

    assert {k: len(v) for k, v in PROMPTS.items()} == {"chat": 8, "summarization": 8, "code": 8, "repetitive": 8}
    pairs = prompt_set()
    assert len(pairs) == 32 and [c for c, _ in pairs[:4]] == list(PROMPTS)  # classes interleaved
    assert not set(WARMUP) & {p for _, p in pairs}
    with pytest.raises(ValueError, match="unknown variant"):
        cli.main(["bench", "spec", "--smoke", "--variants", "medusa", "--out", "/tmp/none", "--no-progress"])


def test_registered_in_the_tokaccel_cli():
    from tokaccel import cli as main_cli

    for module in main_cli.COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            pytest.skip(f"{module} does not exist yet ({exc})")
    args = main_cli.build_parser().parse_args(["bench", "ops", "--smoke"])
    assert args.func is cli.run_ops_command
