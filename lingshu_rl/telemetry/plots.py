"""The reward curve PNG written at the end of a run (matplotlib's Agg canvas directly: no pyplot, no GUI)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

CURVES = (("reward/mean", "reward", "tab:blue"), ("reward/accuracy", "accuracy", "tab:green"))


def smooth(values: list[float], window: int | None = None) -> list[float]:
    """Trailing moving average; the default window is about a tenth of the run (1 to 50 points)."""
    if window is None:
        window = max(1, min(50, len(values) // 10))
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _series(rows: Iterable[Mapping], key: str) -> tuple[list[float], list[float]]:
    by_step: dict[float, float] = {}
    for row in rows:
        step, value = row.get("step"), row.get(key)
        if isinstance(step, (int, float)) and isinstance(value, (int, float)):
            by_step[step] = float(value)  # a repeated step keeps its last value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_reward_curve(rows: Iterable[Mapping], path: str | Path, title: str | None = None) -> Path:
    """Plot ``reward/mean`` per step (raw and smoothed) and ``reward/accuracy`` if logged; always writes a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list(rows)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    plotted = []
    for key, label, color in CURVES:
        steps, values = _series(rows, key)
        if not steps:
            continue
        ax.plot(steps, values, color=color, alpha=0.35, linewidth=1, marker="." if len(steps) < 50 else None,
                label=label)
        ax.plot(steps, smooth(values), color=color, linewidth=2, label=f"{label} (smoothed)")
        plotted.append(label)
    if plotted:
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "no reward/mean logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel(" / ".join(plotted) or "reward")
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "GRPO reward")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
