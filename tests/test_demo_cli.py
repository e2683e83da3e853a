"""The demo and the top-level CLI (smoke: small sizes, real default model)."""

import pytest

from tokaccel import cli
from tokaccel.demo import run_demo


def test_demo_table_marks_dense_identical_to_unpatched(smollm2):
    model, tokenizer = smollm2
    table = run_demo(model, tokenizer, "smollm2-135m-instruct", ["dense"], context_tokens=96, new_tokens=4)
    rows = [line for line in table.splitlines() if line.startswith("| dense ")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[3] == "yes"  # same tokens as unpatched
    assert int(cells[4]) > 96  # keys read per call covers the whole prompt
    assert "unpatched (HF sdpa)" in table


def test_cli_lists_policies(capsys):
    assert cli.main(["policies"]) == 0
    assert "dense" in capsys.readouterr().out


def test_cli_rejects_unknown_command():
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])


def test_cli_plot_on_empty_folder_fails_clearly(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 1
    assert "no eval results or benchmark CSVs" in capsys.readouterr().err
