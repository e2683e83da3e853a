"""Accuracy at equal token budget: eviction and selection policies side by side.

A result's *budget fraction* is the share of the prompt its policy keeps or reads per layer and
step: an eviction policy's `budget` (a fraction, or tokens / prompt length), a selection
policy's (TokenSelect, HISA, Quest, FASA) `n_init + k + n_local` over the prompt length, a
kvpress press's 1 - compression_ratio.
`budget_tables` prints one table per (model, fraction); `plot_budgets` draws accuracy vs length,
one panel per task, a line per policy (solid: the larger fraction).
"""

from __future__ import annotations

from pathlib import Path

from .runner import length_name, collect_results, slug


def budget_fraction(result: dict) -> float | None:
    """The share of the prompt the result's policy keeps (eviction) or reads (selection), rounded
    to 2 decimals; 1.0 for dense and unpatched runs; None when not known."""
    policy, config, length = result["policy"], result["config"].get("policy_config") or {}, result["length"]
    if policy in ("dense", "none"):
        return 1.0
    if "budget" in config:
        budget = config["budget"]
        return round(budget if isinstance(budget, float) else budget / length, 2)
    if {"k", "n_init", "n_local"} <= config.keys():  # tokenselect and the other selection policies
        return round((config["n_init"] + config["k"] + config["n_local"]) / length, 2)
    if policy == "kvpress" and config.get("compression_ratio") is not None:
        return round(1 - config["compression_ratio"], 2)
    return None


def _name(result: dict) -> str:
    """The policy's column name: kvpress results are named by press ("kvpress:SnapKV")."""
    press = (result["config"].get("policy_config") or {}).get("press") if result["policy"] == "kvpress" else None
    return f"kvpress:{press.removesuffix('Press')}" if press else result["policy"]


def _labels(results: list[dict]) -> dict[int, str]:
    """id(result) -> column name: `_name`, plus `key=value` for each option that differs between
    results of that name in one cell (same task, length and fraction), so that two runs of one
    policy at one share never overwrite each other."""
    cells: dict[tuple, list[dict]] = {}
    for r in results:
        cells.setdefault((_name(r), r["task"], r["length"], budget_fraction(r)), []).append(r)
    differing: dict[str, set] = {}
    for (name, *_), group in cells.items():
        configs = [r["config"].get("policy_config") or {} for r in group]
        keys = set().union(*configs)
        differing.setdefault(name, set()).update(
            k for k in keys if len({repr(c.get(k)) for c in configs}) > 1)
    labels = {}
    for r in results:
        config, keys = r["config"].get("policy_config") or {}, sorted(differing.get(_name(r), ()))
        labels[id(r)] = _name(r) + (":" + ",".join(f"{k}={config.get(k)}" for k in keys) if keys else "")
    return labels


def budget_tables(results: list[dict]) -> str:
    """Markdown: per (model, budget fraction) a row per (task, length), a column per policy, with
    dense's score as the first column."""
    out = []
    label = _labels(results)
    for model in sorted({r["model"] for r in results}):
        mine = [r for r in results if r["model"] == model]
        dense = {(r["task"], r["length"]): r["score"] for r in mine if r["policy"] == "dense"}
        fractions = sorted({f for r in mine if (f := budget_fraction(r)) not in (None, 1.0)}, reverse=True)
        for fraction in fractions:
            rows = [r for r in mine if budget_fraction(r) == fraction]
            policies = sorted({label[id(r)] for r in rows})
            cells = {(r["task"], r["length"], label[id(r)]): r for r in rows}
            out.append(f"**{model}, {fraction:.0%} of the prompt kept / read per layer** (score, samples)\n")
            out.append("| task | length | dense | " + " | ".join(policies) + " |")
            out.append("|---|---|---:|" + "---:|" * len(policies))
            for task, length in sorted({(r["task"], r["length"]) for r in rows}):
                line = [task, length_name(length), f"{dense[(task, length)]:.1f}" if (task, length) in dense else "-"]
                for p in policies:
                    r = cells.get((task, length, p))
                    line.append(f"{r['score']:.1f} ({r['n_samples']})" if r else "-")
                out.append("| " + " | ".join(line) + " |")
            out.append("")
    return "\n".join(out)


def _colors(policies: list[str]) -> dict:
    """A tab20 colour per policy, dark shades first."""
    import matplotlib

    palette = [matplotlib.colormaps["tab20"](i) for i in [*range(0, 20, 2), *range(1, 20, 2)]]
    return {p: palette[i % len(palette)] for i, p in enumerate(policies)}


def _style_panel(ax, title: str, xlabel: str) -> None:
    ax.set_ylim(-3, 103)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("score (0-100)")
    ax.grid(alpha=0.3)


def _save(fig, labelled: dict, title: str, target: Path, ncols: int) -> Path:
    """Legend below the panels, title, PNG at `target`."""
    fig.legend(list(labelled.values()), list(labelled), loc="outside lower center", ncols=ncols, fontsize=7)
    fig.suptitle(title)
    fig.savefig(target, dpi=110)
    return target


def plot_budgets(path, out_dir=None) -> list[Path]:
    """`<model>_accuracy_at_equal_budget.png` for the results under `path` (into `out_dir`,
    default `path/plots`)."""
    from .plots import figure

    results = collect_results(path)
    out = Path(out_dir) if out_dir else Path(path) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for model in sorted({r["model"] for r in results}):
        mine = [r for r in results if r["model"] == model and budget_fraction(r) is not None]
        column = _labels(mine)
        tasks = sorted({r["task"] for r in mine})
        fractions = sorted({budget_fraction(r) for r in mine} - {1.0}, reverse=True)
        fig, axes = figure(len(tasks), width=4.6)
        policies = sorted(set(column.values()))
        colors = _colors(policies)
        labelled = {}
        for ax, task in zip(axes, tasks):
            for policy in sorted({column[id(r)] for r in mine if r["task"] == task}):
                for fraction in ([1.0] if policy == "dense" else fractions):
                    points = sorted((r["length"], r["score"]) for r in mine if r["task"] == task
                                    and column[id(r)] == policy and budget_fraction(r) == fraction)
                    if not points:
                        continue
                    style = "-" if fraction in (1.0, fractions[0]) else "--"
                    label = policy if policy == "dense" else f"{policy} {fraction:.0%}"
                    line, = ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o",
                                    color=colors[policy], label=label)
                    labelled.setdefault(label, line)
            ax.set_xscale("log", base=2)
            _style_panel(ax, task, "prompt length (tokens)")
        written.append(_save(fig, labelled, f"{model}: accuracy at equal token budget (share of the prompt kept / read)",
                             out / f"{slug(model)}_accuracy_at_equal_budget.png", ncols=4))
    return written


def plot_vs_budget(path, out_dir=None) -> list[Path]:
    """`<model>_accuracy_vs_budget.png` for the results under `path` (into `out_dir`, default
    `path/plots`): one panel per (task, length) holding two or more budget fractions, score vs the
    share of the prompt kept / read, a line per policy, dense dashed."""
    from .plots import figure

    results = collect_results(path)
    out = Path(out_dir) if out_dir else Path(path) / "plots"
    written = []
    for model in sorted({r["model"] for r in results}):
        mine = [r for r in results if r["model"] == model and budget_fraction(r) is not None]
        label = _labels(mine)
        panels = sorted(key for key in {(r["task"], r["length"]) for r in mine}
                        if len({budget_fraction(r) for r in mine if (r["task"], r["length"]) == key} - {1.0}) > 1)
        if not panels:
            continue
        out.mkdir(parents=True, exist_ok=True)
        fig, axes = figure(len(panels), width=4.2)
        policies = sorted(set(label.values()) - {"dense"})
        colors = _colors(policies)
        labelled = {}
        for ax, (task, length) in zip(axes, panels):
            cell = [r for r in mine if (r["task"], r["length"]) == (task, length)]
            for r in cell:
                if r["policy"] == "dense":
                    labelled.setdefault("dense", ax.axhline(r["score"], color="k", ls="--"))
            for policy in policies:
                points = sorted((budget_fraction(r), r["score"]) for r in cell if label[id(r)] == policy)
                if points:
                    line, = ax.plot([100 * p[0] for p in points], [p[1] for p in points], marker="o",
                                    color=colors[policy], label=policy)
                    labelled.setdefault(policy, line)
            _style_panel(ax, f"{task}, {length_name(length)}", "% of the prompt kept / read per step")
        written.append(_save(fig, labelled, f"{model}: accuracy vs token budget",
                             out / f"{slug(model)}_accuracy_vs_budget.png", ncols=5))
    return written
