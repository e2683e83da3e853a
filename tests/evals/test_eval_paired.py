"""Paired comparison on the same prompts (`tokaccel eval --report DIR --against SPEC`): the
interval, the verdicts, the rows needed for a margin, which results pair, and the CLI."""

import json
import math

import pytest

from tokaccel import cli
from tokaccel.evals.paired import paired_comparisons, paired_interval, paired_table, samples_for_margin, verdict
from tokaccel.evals.runner import collect_results


def test_interval_is_agresti_min_for_paired_proportions():
    b, c, n = 3, 1, 20  # rows where the policy alone / the reference alone is right; 16 ties
    mean, low, high = paired_interval([1] * b + [-1] * c + [0] * (n - b - c))
    p12, p21 = (b + 0.5) / (n + 2), (c + 0.5) / (n + 2)  # half a row added to each of the four cells
    half = 1.959964 * math.sqrt((p12 + p21 - (p12 - p21) ** 2) / (n + 2))
    assert mean == pytest.approx(p12 - p21) and (low, high) == (pytest.approx(p12 - p21 - half), pytest.approx(p12 - p21 + half))


def test_twenty_tied_rows_do_not_resolve_three_points():
    mean, low, high = paired_interval([0.0] * 20)
    assert mean == 0 and high == -low == pytest.approx(1.959964 / 22)  # +-8.9 points, not a certain 0
    assert verdict(100 * low, 100 * high, 3) == "unresolved"
    assert samples_for_margin([0.0] * 20, 3) == 64  # 1.96 / (n + 2) <= 0.03
    assert verdict(*(100 * x for x in paired_interval([0.0] * 64)[1:]), 3) == "within +-3"
    assert verdict(*(100 * x for x in paired_interval([0.0] * 63)[1:]), 3) == "unresolved"


def test_verdicts_and_rows_needed():
    assert verdict(4, 30, 3) == "better by > 3"
    assert verdict(-2, 2.5, 3) == "within +-3"
    assert verdict(-3, 20, 3) == "not worse by > 3"
    assert verdict(-40, -3.5, 3) == "worse by > 3"
    assert verdict(-10, 5, 3) == "unresolved"
    assert samples_for_margin([0.0] * 19 + [-1.0], 3) is None  # observed -5 points: beyond the margin at any size
    split = [1.0, -1.0] * 10  # half the rows disagree, evenly
    needed = samples_for_margin(split, 3)
    assert needed > 4000 and samples_for_margin(split, 10) < needed  # a wider margin needs fewer rows
    _, low, high = paired_interval([1.0, -1.0] * (needed // 2 + 1))
    assert -0.03 <= low and high <= 0.03


def _write(root, policy, config, scores, length=1024, dtype="bfloat16", answers=None, seed=0):
    label = policy + (":" + ",".join(f"{k}={v}" for k, v in sorted(config.items())) if config else "")
    folder = root / "smol" / "niah" / str(length) / f"{policy}-{abs(hash((label, dtype, seed))) % 10**8}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model": "smol", "task": "niah", "length": length, "policy": policy, "policy_label": label,
        "policy_config": config, "dtype": dtype, "seed": seed, "prefill_chunk": 2048, "reuse_context": True}))
    (folder / "metrics.json").write_text(json.dumps({"metric": "string_match_all", "n_samples": len(scores),
                                                     "score": 100 * sum(scores) / len(scores), "higher_is_better": True}))
    with open(folder / "predictions.jsonl", "w") as f:
        for i, s in enumerate(scores):
            f.write(json.dumps({"index": i, "score": s, "answers": [answers[i] if answers else str(i)]}) + "\n")


BUDGET = {"k": 208, "n_init": 16, "n_local": 32}  # 25 % of 1K


@pytest.fixture
def folder(tmp_path):
    _write(tmp_path, "dense", {}, [1, 1, 1, 1, 0, 1])
    _write(tmp_path, "tokenselect", BUDGET, [1, 1, 0, 1, 0, 1])
    _write(tmp_path, "tokenselect", {**BUDGET, "pool": 15}, [1, 1, 1, 1, 0, 1])
    _write(tmp_path, "tokenselect", {"k": 416, "n_init": 32, "n_local": 64}, [1] * 6)  # 50 %: its own reference
    _write(tmp_path, "hisa", {**BUDGET, "block": 16, "m": 16}, [1, 0, 1, 1, 0, 1])
    _write(tmp_path, "quest", {"k": 416, "n_init": 32, "n_local": 64}, [1, 1, 1, 1, 1, 0])
    _write(tmp_path, "h2o", {"budget": 0.25}, [0, 0, 0, 1, 0, 1])
    _write(tmp_path, "fasa", BUDGET, [1, 1, 0, 1, 0, 1], dtype="float32")  # other prompts' numerics: no pair
    _write(tmp_path, "quest", BUDGET, [1, 1, 0, 1, 0, 1], seed=1)  # other prompts: no pair
    return tmp_path


def _pairs(comparisons):
    return {(c["policy"], c["reference"]): c for c in comparisons}


def test_results_pair_with_the_reference_at_their_budget(folder):
    pairs = _pairs(paired_comparisons(collect_results(folder), "tokenselect"))
    quarter, half = "tokenselect:k=208,n_init=16,n_local=32", "tokenselect:k=416,n_init=32,n_local=64"
    assert set(pairs) == {("tokenselect:k=208,n_init=16,n_local=32,pool=15", quarter),
                          ("hisa:block=16,k=208,m=16,n_init=16,n_local=32", quarter),
                          ("h2o:budget=0.25", quarter), ("quest:k=416,n_init=32,n_local=64", half)}
    hisa = pairs[("hisa:block=16,k=208,m=16,n_init=16,n_local=32", quarter)]
    assert (hisa["n"], hisa["better"], hisa["worse"], hisa["score"], hisa["reference_score"]) == (6, 1, 1, 400 / 6, 400 / 6)
    assert hisa["diff"] == 0 and hisa["verdict"] == "unresolved" and hisa["fraction"] == 0.25
    pooled = _pairs(paired_comparisons(collect_results(folder), "tokenselect:pool=15"))
    assert set(ref for _, ref in pooled) == {"tokenselect:k=208,n_init=16,n_local=32,pool=15"}


def test_dense_as_reference_pairs_every_budget(folder):
    pairs = _pairs(paired_comparisons(collect_results(folder), "dense"))
    assert {policy for policy, _ in pairs} == {"tokenselect:k=208,n_init=16,n_local=32", "h2o:budget=0.25",
                                              "tokenselect:k=208,n_init=16,n_local=32,pool=15", "hisa:block=16,k=208,m=16,n_init=16,n_local=32",
                                              "tokenselect:k=416,n_init=32,n_local=64", "quest:k=416,n_init=32,n_local=64"}
    h2o = pairs[("h2o:budget=0.25", "dense")]
    assert (h2o["better"], h2o["worse"]) == (0, 3) and h2o["diff"] == pytest.approx(-50.0)
    assert (h2o["low"] + h2o["high"]) / 2 == pytest.approx(-100 * 3 / 8)  # the interval is around the shrunk mean


def test_a_reference_run_in_two_dtypes_pairs_by_dtype(tmp_path):
    for dtype in ("bfloat16", "float32"):
        _write(tmp_path, "tokenselect", {**BUDGET, "pool": 15}, [1, 1, 0, 1], dtype=dtype)
    _write(tmp_path, "hisa", {**BUDGET, "block": 16, "m": 16}, [1, 0, 0, 1], dtype="float32")
    (c,) = paired_comparisons(collect_results(tmp_path), "tokenselect:pool=15")
    assert c["reference"] == "tokenselect:k=208,n_init=16,n_local=32,pool=15 (float32)" and c["worse"] == 1


def test_rows_of_other_prompts_are_not_paired(tmp_path):
    _write(tmp_path, "tokenselect", BUDGET, [1, 1, 1, 1], answers=["a", "b", "c", "d"])
    _write(tmp_path, "hisa", {**BUDGET, "block": 16, "m": 16}, [0, 1, 1, 0, 0], answers=["a", "x", "c", "y", "e"])
    (c,) = paired_comparisons(collect_results(tmp_path), "tokenselect")
    assert (c["n"], c["worse"], c["score"]) == (2, 1, 50.0)  # rows 0 and 2: same index, same answers


def test_table_and_cli(folder, capsys):
    text = paired_table(paired_comparisons(collect_results(folder), "tokenselect"))
    assert "| niah | 1K | 25% | hisa:block=16,k=208,m=16,n_init=16,n_local=32 | tokenselect:k=208,n_init=16,n_local=32 | 6 |" in text
    assert "verdicts: " in text
    assert cli.main(["eval", "--report", str(folder), "--against", "tokenselect", "--margin", "5"]) == 0
    out = capsys.readouterr().out
    assert "rows for +-5" in out and "h2o:budget=0.25" in out
    assert cli.main(["eval", "--report", str(folder), "--against", "snapkv"]) == 2
    assert "no result" in capsys.readouterr().err
    assert cli.main(["eval", "--report", str(folder), "--against", "tokenselect", "--margin", "0"]) == 2
