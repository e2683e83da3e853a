"""Result rows: CSV append with one header, metadata columns, markdown tables."""

import csv

from tokaccel.bench.results import METADATA_COLUMNS, append_rows, markdown_table, read_rows, run_metadata


def test_metadata_has_device_versions_commit_and_timestamp():
    meta = run_metadata("cpu")
    assert set(METADATA_COLUMNS) <= set(meta)
    assert meta["device"] == "cpu" and meta["torch"] and meta["transformers"] and meta["timestamp"]


def test_append_writes_the_header_once_and_merges_new_columns(tmp_path):
    path = tmp_path / "bench_ops.csv"
    append_rows(path, [{"a": 1, "b": 2.5}])
    append_rows(path, [{"a": 3, "b": None}])
    lines = path.read_text().splitlines()
    assert lines[0] == "a,b" and len(lines) == 3
    append_rows(path, [{"a": 5, "c": "x"}])  # a new column: the file is rewritten with the union
    with path.open() as f:
        header = next(csv.reader(f))
    assert header == ["a", "b", "c"]
    rows = read_rows(path)
    assert [r["a"] for r in rows] == ["1", "3", "5"] and rows[0]["c"] == "" and rows[2]["c"] == "x"


def test_markdown_table():
    table = markdown_table([{"n": 4096, "ms": 1.23456, "x": None}], ["n", "ms", "x"], ["N", "ms", "x"])
    assert table.splitlines() == ["| N | ms | x |", "|---|---|---|", "| 4096 | 1.23 |  |"]
