"""Paired comparison on the same prompts: is a policy within M points of a reference policy?

Two results are paired when they ran the same prompts: same model, task, length, seed, dtype and
prompt settings, rows matched by sample index (and checked to hold the same answers), and,
unless the reference is dense, the same budget fraction (`budgets.budget_fraction`). Per pair
of rows d = score - reference score, in [-1, 1]. The 95 % interval of mean(d) is Agresti and
Min's adjusted Wald interval for paired proportions (one half added to each cell of the 2 x 2
table; for 0/1 scores), written for any d in [-1, 1]:

    n' = n + 2,  mean = sum(d) / n',  var = (sum(d^2) + 1) / n' - mean^2,  mean +- z sqrt(var / n')

(centred on the shrunk mean; tables show the plain mean difference) so twenty tied rows give
+-8.9 points, not a certain 0. Verdicts at a margin M (points):
"better by > M" (low > M), "within +-M" (the interval inside [-M, M]), "not worse by > M"
(low >= -M), "worse by > M" (high < -M), otherwise "unresolved"; `samples_for_margin` is how
many rows would put the interval inside [-M, M] at the observed mean and spread.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .budgets import budget_fraction
from .runner import length_name

Z95 = 1.959964
BUDGET_KEYS = ("k", "n_init", "n_local", "budget")
PROMPT_SETTINGS = ("seed", "dtype", "chat", "prefill_chunk", "reuse_context", "max_new_tokens", "task_params")


def paired_interval(diffs: list[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high) of the adjusted Wald interval above, for per-row differences in [-1, 1]."""
    n = len(diffs)
    return _interval_of(n, sum(diffs) / max(n, 1), sum(d * d for d in diffs) / max(n, 1), z)


def _interval_of(rows: int, mean: float, square: float, z: float = Z95) -> tuple[float, float, float]:
    """The interval of `rows` differences whose mean is `mean` and mean square `square`."""
    n2 = rows + 2
    adjusted = mean * rows / n2
    var = max((square * rows + 1) / n2 - adjusted * adjusted, 0.0)
    half = z * math.sqrt(var / n2)
    return adjusted, adjusted - half, adjusted + half


def verdict(low: float, high: float, margin: float) -> str:
    """The verdict of an interval (in points) at `margin` points; see the module docstring."""
    if low > margin:
        return f"better by > {margin:g}"
    if low >= -margin and high <= margin:
        return f"within +-{margin:g}"
    if low >= -margin:
        return f"not worse by > {margin:g}"
    if high < -margin:
        return f"worse by > {margin:g}"
    return "unresolved"


def samples_for_margin(diffs: list[float], margin: float, z: float = Z95, most: int = 10**7) -> int | None:
    """Rows for the interval to fit inside [-margin, margin] (points) if the per-row mean and
    mean square of `diffs` held; None when the observed mean is beyond the margin (or past
    `most` rows)."""
    n, m = len(diffs), margin / 100
    if n == 0 or abs(sum(diffs) / n) >= m:
        return None
    mean, square = sum(diffs) / n, sum(d * d for d in diffs) / n

    def fits(rows: int) -> bool:
        _, low, high = _interval_of(rows, mean, square, z)
        return low >= -m and high <= m

    low_n, high_n = 1, 1
    while not fits(high_n):
        if high_n >= most:
            return None
        low_n, high_n = high_n, high_n * 2
    while low_n < high_n:
        mid = (low_n + high_n) // 2
        low_n, high_n = (low_n, mid) if fits(mid) else (mid + 1, high_n)
    return high_n


def _rows(result: dict) -> dict[int, dict]:
    with open(Path(result["folder"]) / "predictions.jsonl", encoding="utf-8") as f:
        return {row["index"]: row for row in map(json.loads, f)}


def _options(label: str) -> tuple[str, dict]:
    """(name, non-budget options) of a policy label; the whole label as name when it is no spec."""
    from ..registry import parse_spec

    try:
        name, config = parse_spec(re.sub(r" \(\w+\)$", "", label))  # collect_results' " (dtype)" suffix
    except ValueError:
        return label, {}
    return name, {k: v for k, v in config.items() if k not in BUDGET_KEYS}


def is_reference(result: dict, spec: str) -> bool:
    """Whether `result` ran `spec`: its label is `spec`, or it has spec's name and exactly spec's
    options besides the budget ("tokenselect" matches "tokenselect:k=2048", not "...,pool=15")."""
    return result["policy_label"] == spec or _options(result["policy_label"]) == _options(spec)


def _same_prompts(a: dict, b: dict) -> bool:
    return all(a["config"].get(key) == b["config"].get(key) for key in PROMPT_SETTINGS) and \
        (a["model"], a["task"], a["length"]) == (b["model"], b["task"], b["length"])


def paired_comparisons(results: list[dict], against: str, margin: float = 3.0) -> list[dict]:
    """One dict per (result, reference result) pair of `results` (see the module docstring):
    model, task, length, fraction, policy, n, score, reference score, diff / low / high (points),
    better / worse (rows), verdict, samples_for_margin. Perplexity results are skipped."""
    results = [r for r in results if r["metrics"].get("higher_is_better", True)]
    references = [r for r in results if is_reference(r, against)]
    out = []
    for ref in references:
        fraction = budget_fraction(ref)
        ref_rows = _rows(ref)
        for r in results:
            if r is ref or not _same_prompts(r, ref):
                continue
            if ref["policy"] != "dense" and budget_fraction(r) != fraction:
                continue
            rows = _rows(r)
            shared = [i for i in sorted(rows.keys() & ref_rows.keys()) if rows[i].get("answers") == ref_rows[i].get("answers")]
            if not shared:
                continue
            diffs = [rows[i]["score"] - ref_rows[i]["score"] for i in shared]
            mean, low, high = paired_interval(diffs)
            out.append({
                "model": r["model"], "task": r["task"], "length": r["length"], "fraction": budget_fraction(r),
                "policy": r["policy_label"], "reference": ref["policy_label"], "n": len(shared),
                "score": 100 * sum(rows[i]["score"] for i in shared) / len(shared),
                "reference_score": 100 * sum(ref_rows[i]["score"] for i in shared) / len(shared),
                "diff": 100 * sum(diffs) / len(diffs), "low": 100 * low, "high": 100 * high,
                "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs),
                "verdict": verdict(100 * low, 100 * high, margin),
                "samples_for_margin": samples_for_margin(diffs, margin),
            })
    return sorted(out, key=lambda c: (c["model"], c["task"], c["length"], -(c["fraction"] or 0), c["policy"]))


def paired_table(comparisons: list[dict], margin: float = 3.0) -> str:
    """Markdown: per model, a row per comparison and a count of the verdicts."""
    out = []
    for model in sorted({c["model"] for c in comparisons}):
        mine = [c for c in comparisons if c["model"] == model]
        out.append(f"**{model}** (points; diff = policy - reference on the same rows, 95 % interval; "
                   f"+/-: rows better / worse; rows needed for +-{margin:g} at the observed mean and spread)\n")
        out.append("| task | length | share read | policy | reference | rows | score | ref. | diff (95 % CI) | +/- "
                   f"| verdict | rows for +-{margin:g} |")
        out.append("|---|---|---:|---|---|---:|---:|---:|---|---|---|---:|")
        for c in mine:
            share = "-" if c["fraction"] is None else f"{c['fraction']:.0%}"
            needed = "-" if c["samples_for_margin"] is None else str(c["samples_for_margin"])
            out.append(f"| {c['task']} | {length_name(c['length'])} | {share} | {c['policy']} | {c['reference']} "
                       f"| {c['n']} | {c['score']:.1f} | {c['reference_score']:.1f} "
                       f"| {c['diff']:+.1f} ({c['low']:+.1f}, {c['high']:+.1f}) | {c['better']}/{c['worse']} "
                       f"| {c['verdict']} | {needed} |")
        counts: dict[str, int] = {}
        for c in mine:
            counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
        out.append("\nverdicts: " + ", ".join(f"{v} {n}" for v, n in sorted(counts.items())) + "\n")
    return "\n".join(out)
