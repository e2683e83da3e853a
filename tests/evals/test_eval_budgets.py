"""Accuracy at equal token budget: the share each result's policy keeps or reads, the tables and
the plot of `tokaccel eval --report DIR --by-budget`."""

import json

import pytest

from tokaccel.evals.budgets import budget_fraction, budget_tables, plot_budgets, plot_vs_budget
from tokaccel.evals.runner import collect_results

RUNS = [  # (policy, policy_config, length, score)
    ("dense", {}, 1024, 90.0),
    ("h2o", {"budget": 0.25, "recent": 0.5}, 1024, 40.0),
    ("snapkv", {"budget": 256}, 1024, 50.0),  # tokens: 256 / 1024 = 25 %
    ("tokenselect", {"k": 208, "n_init": 16, "n_local": 32}, 1024, 60.0),
    ("hisa", {"k": 208, "n_init": 16, "n_local": 32, "block": 16, "m": 16}, 1024, 55.0),
    ("kvpress", {"press": "SnapKVPress", "compression_ratio": 0.75}, 1024, 30.0),
    ("kvpress", {"press": "StreamingLLMPress", "compression_ratio": 0.75}, 1024, 20.0),
    ("h2o", {"budget": 0.5}, 1024, 70.0),
    ("dense", {}, 2048, 80.0),
    ("h2o", {"budget": 0.25}, 2048, 35.0),
    ("quest", {"k": 100}, 1024, 10.0),  # a share this module does not know: left out
]


def _write(root, policy, config, length, score):
    label = policy + ":" + ",".join(f"{k}={v}" for k, v in config.items()) if config else policy
    folder = root / "smol" / "niah" / str(length) / f"{policy}-{abs(hash(label)) % 10**8}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model": "smol", "task": "niah", "length": length, "policy": policy,
                                                    "policy_label": label, "policy_config": config,
                                                    "dtype": "bfloat16"}))
    (folder / "metrics.json").write_text(json.dumps({"metric": "string_match_all", "score": score, "n_samples": 20}))


@pytest.fixture
def results(tmp_path):
    for run in RUNS:
        _write(tmp_path, *run)
    return tmp_path, collect_results(tmp_path)


def test_budget_fraction(results):
    _, found = results
    fractions = sorted((r["policy_label"], budget_fraction(r)) for r in found if r["length"] == 1024)
    assert fractions == [
        ("dense", 1.0), ("h2o:budget=0.25,recent=0.5", 0.25), ("h2o:budget=0.5", 0.5),
        ("hisa:k=208,n_init=16,n_local=32,block=16,m=16", 0.25),
        ("kvpress:press=SnapKVPress,compression_ratio=0.75", 0.25),
        ("kvpress:press=StreamingLLMPress,compression_ratio=0.75", 0.25),
        ("quest:k=100", None), ("snapkv:budget=256", 0.25), ("tokenselect:k=208,n_init=16,n_local=32", 0.25)]


def test_budget_tables(results):
    _, found = results
    text = budget_tables(found)
    assert text.startswith("**smol, 50% of the prompt kept / read per layer**")  # the larger share first
    half, quarter = text.split("**smol, 25% of the prompt kept / read per layer**")
    header = "| task | length | dense | h2o | hisa | kvpress:SnapKV | kvpress:StreamingLLM | snapkv | tokenselect |"
    assert header in quarter  # presses get their own columns
    assert "| niah | 1K | 90.0 | 40.0 (20) | 55.0 (20) | 30.0 (20) | 20.0 (20) | 50.0 (20) | 60.0 (20) |" in quarter
    assert "| niah | 2K | 80.0 | 35.0 (20) | - | - | - | - | - |" in quarter
    assert "| niah | 1K | 90.0 | 70.0 (20) |" in half and "quest" not in text


def test_plot_budgets(results, tmp_path):
    pytest.importorskip("matplotlib")
    root, _ = results
    written = plot_budgets(root, out_dir=tmp_path / "plots")
    assert [p.name for p in written] == ["smol_accuracy_at_equal_budget.png"]
    assert written[0].stat().st_size > 5000 and written[0].read_bytes()[:4] == b"\x89PNG"


def test_two_runs_of_one_policy_at_one_share_get_their_own_columns(tmp_path):
    for run in [("dense", {}, 1024, 90.0), ("snapkv", {"budget": 0.5, "window": 32}, 1024, 15.0),
                ("snapkv", {"budget": 0.5, "window": 64}, 1024, 35.0), ("snapkv", {"budget": 0.5, "window": 64}, 2048, 5.0),
                ("h2o", {"budget": 0.5}, 1024, 70.0)]:
        _write(tmp_path, *run)
    text = budget_tables(collect_results(tmp_path))
    assert "| task | length | dense | h2o | snapkv:window=32 | snapkv:window=64 |" in text
    assert "| niah | 1K | 90.0 | 70.0 (20) | 15.0 (20) | 35.0 (20) |" in text
    assert "| niah | 2K | - | - | - | 5.0 (20) |" in text


def test_plot_vs_budget(results, tmp_path):
    pytest.importorskip("matplotlib")
    root, _ = results
    written = plot_vs_budget(root, out_dir=tmp_path / "plots")
    assert [p.name for p in written] == ["smol_accuracy_vs_budget.png"]  # niah 1K holds 25 % and 50 %
    assert written[0].stat().st_size > 5000 and written[0].read_bytes()[:4] == b"\x89PNG"
    single = tmp_path / "one"
    _write(single, "h2o", {"budget": 0.5}, 1024, 70.0)
    assert plot_vs_budget(single, out_dir=tmp_path / "none") == []  # one share per cell: nothing to draw


def test_cli_by_budget(results, capsys):
    from tokaccel import cli

    root, _ = results
    assert cli.main(["eval", "--report", str(root), "--by-budget"]) == 0
    printed = capsys.readouterr().out
    assert "**smol, 25% of the prompt kept / read per layer**" in printed
    assert "smol_accuracy_vs_budget.png" in printed
    assert (root / "plots" / "smol_accuracy_at_equal_budget.png").exists()
