"""The PNG charts: accuracy per benchmark with its 95% interval, and the same grouped by checkpoint
(matplotlib's Agg canvas directly: no pyplot, no GUI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = ("tab:gray", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:red")


def _figure(n_groups: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.2 * n_groups + 2), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, ax, names: list[str], title: str, path: Path) -> Path:
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylim(0, 112)  # headroom for the legend above 100%
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("accuracy (%), 95% CI")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _bars(ax, offsets: list[float], entries: list[dict[str, Any] | None], width: float, **style) -> None:
    """Bars with asymmetric error bars; a benchmark without accuracy (reports, absent) gets no bar."""
    xs: list[float] = []
    heights: list[float] = []
    errors: list[list[float]] = [[], []]
    for x, entry in zip(offsets, entries):
        if entry is None or entry.get("accuracy") is None:
            continue
        acc, (low, high) = 100 * entry["accuracy"], entry["ci95"]
        xs.append(x)
        heights.append(acc)
        errors[0].append(max(0.0, acc - 100 * low))  # clamped: float error at 0% / 100%
        errors[1].append(max(0.0, 100 * high - acc))
    ax.bar(xs, heights, width, yerr=errors, capsize=3, **style)


def accuracy_chart(benchmarks: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """One bar per benchmark."""
    names = list(benchmarks)
    fig, ax = _figure(len(names))
    _bars(ax, list(range(len(names))), [benchmarks[n] for n in names], 0.6, color="tab:blue")
    return _save(fig, ax, names, title, path)


def comparison_chart(runs: dict[str, dict[str, dict[str, Any]]], names: list[str], path: Path) -> Path:
    """Grouped bars: one group per benchmark, one bar per checkpoint (``runs``: checkpoint -> benchmarks)."""
    fig, ax = _figure(len(names))
    width = 0.8 / max(1, len(runs))
    for i, (run, benchmarks) in enumerate(runs.items()):
        offsets = [x - 0.4 + width * (i + 0.5) for x in range(len(names))]
        _bars(ax, offsets, [benchmarks.get(n) for n in names], width, color=COLORS[i % len(COLORS)], label=run)
    ax.legend(loc="upper center", ncol=len(runs), fontsize="small", frameon=False)
    return _save(fig, ax, names, "accuracy by checkpoint", path)
