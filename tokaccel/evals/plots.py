"""PNG plots from eval result folders (matplotlib, imported lazily, Agg canvas).

For each model: `<model>_accuracy_vs_length.png` (one panel per task, one line per policy) and
`<model>_depth_heatmap_<policy>.png` (needle depth x length, one panel per needle task).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .runner import collect_results, slug

logger = logging.getLogger(__name__)


def figure(panels: int, width: float = 4.2, height: float = 3.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]
    return fig, axes


def _accuracy_vs_length(model: str, results: list[dict], out_dir: Path) -> Path:
    tasks = sorted({r["task"] for r in results})
    colors = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(r["policy_label"] for r in results))}
    fig, axes = figure(len(tasks))
    for ax, task in zip(axes, tasks):
        rows = [r for r in results if r["task"] == task]
        for label in dict.fromkeys(r["policy_label"] for r in rows):  # one colour per policy in every panel
            points = sorted((r["length"], r["score"]) for r in rows if r["policy_label"] == label)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, color=colors[label])
        ppl = rows[0]["metric"] == "ppl"
        ax.set_xscale("log", base=2)
        ax.set_title(task)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("perplexity" if ppl else "score (0-100)")
        if not ppl:
            ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{model}: accuracy vs length")
    path = out_dir / f"{slug(model)}_accuracy_vs_length.png"
    fig.savefig(path, dpi=110)
    return path


def _depth_heatmaps(model: str, label: str, results: list[dict], out_dir: Path) -> Path | None:
    rows = [r for r in results if r["policy_label"] == label and r["metrics"].get("by_depth")]
    tasks = sorted({r["task"] for r in rows})
    if not tasks:
        return None
    import numpy as np

    fig, axes = figure(len(tasks), width=4.8)
    image = None
    for ax, task in zip(axes, tasks):
        cells = {(r["length"], d): v for r in rows if r["task"] == task for d, v in r["metrics"]["by_depth"].items()}
        lengths = sorted({k[0] for k in cells})
        depths = sorted({k[1] for k in cells}, key=float)
        grid = np.full((len(depths), len(lengths)), np.nan)
        for (length, depth), value in cells.items():
            grid[depths.index(depth), lengths.index(length)] = value
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(task)
        if grid.size <= 120:
            for (i, j), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="score")
    fig.suptitle(f"{model} / {label}: needle depth x length")
    path = out_dir / f"{slug(model)}_depth_heatmap_{slug(label)}.png"
    fig.savefig(path, dpi=110)
    return path


def plot_results(path, out_dir=None) -> list[Path]:
    """Write the plots for the eval results under `path` into `out_dir` (default `path/plots`).
    Returns the PNG paths, [] when `path` holds no eval results."""
    results = collect_results(path)
    if not results:
        return []
    out = Path(out_dir) if out_dir else Path(path) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for model in sorted({r["model"] for r in results}):
        mine = [r for r in results if r["model"] == model]
        written.append(_accuracy_vs_length(model, mine, out))
        for label in dict.fromkeys(r["policy_label"] for r in mine):
            heatmap = _depth_heatmaps(model, label, mine, out)
            if heatmap is not None:
                written.append(heatmap)
    logger.info("wrote %d plots to %s", len(written), out)
    return written
