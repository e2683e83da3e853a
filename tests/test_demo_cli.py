"""The demo and the top-level CLI (smoke: small sizes, real default model)."""

import json

import pytest

from tokaccel import cli
from tokaccel.demo import end_to_end, end_to_end_table, op_level, op_level_table


SMALL = "tokenselect:k=256,n_init=16,n_local=64,position_mode=original"


def test_demo_end_to_end_pairs_each_prompt_and_scores_answers(smollm2):
    """Dense reads every key and gives the unpatched model's tokens and answers; the table reports
    both variants with paired speedups."""
    model, tokenizer = smollm2
    result = end_to_end(model, tokenizer, "dense", context=256, samples=2, progress=False)
    base, dense = result["hf"], result["dense"]
    assert len(base["ttft"]) == len(dense["ttft"]) == 2 and all(t > 0 for t in base["ttft"] + dense["tpot"])
    assert dense["same"] == [1.0, 1.0] and dense["correct"] == base["correct"]
    assert dense["stats"]["keys_read"] >= dense["stats"]["calls"] * 200  # every step read the whole prompt
    table = end_to_end_table(result, "dense")
    assert "| unpatched (HF sdpa) |" in table and "| dense |" in table


def test_demo_op_level_finds_the_planted_needles():
    """A budget of 16 + 256 + 64 keys out of 4K: the miss step's selection holds all 16 planted
    needles and most of SDPA's attention weight; a planted needle outside it would fail this."""
    (row,) = op_level(SMALL, [4096], repeats=1, progress=False)
    assert row["keys_read"] == 16 + 256 + 64
    assert row["needles_found"] == row["needles"] == 16
    assert 0.5 < row["weight_read"] <= 1.0 + 1e-6
    assert 0 <= row["output_error"] < 0.5  # the missed weight is small: the output stays near SDPA's
    assert row["sdpa_ms"] > 0 and row["hit_ms"] > 0 and row["miss_ms"] > 0
    assert "| 4K |" in op_level_table([row])


def test_demo_command_runs_the_op_level_part_and_writes_its_result(capsys, tmp_path):
    assert cli.main(["demo", "--samples", "0", "--op-lengths", "4096", "--policy", SMALL, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2. Op level" in out and "16 / 16" in out
    (path,) = tmp_path.glob("demo-*.json")
    record = json.loads(path.read_text())
    assert record["options"]["policy"] == SMALL and "git_commit" in record["metadata"]
    assert record["op_level"]["rows"][0]["needles_found"] == 16 and "end_to_end" not in record


def test_cli_lists_policies(capsys):
    assert cli.main(["policies"]) == 0
    assert "dense" in capsys.readouterr().out


def test_cli_rejects_unknown_command():
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])


def test_cli_plot_on_empty_folder_fails_clearly(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 1
    assert "no eval results or benchmark CSVs" in capsys.readouterr().err
