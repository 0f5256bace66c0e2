"""The one-line-per-step console summary, and line output that cooperates with a live progress bar."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import TextIO

# Live TTY progress bars (see progress.py): a printed line first clears the bar, then the bar is redrawn below it.
_active_bars: list = []

# (metric key, label) groups; each group becomes one " | "-separated section when any of its keys is present.
_SECTIONS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("reward/mean", "reward"), ("reward/accuracy", "acc")),
    (("actor/kl", "kl"),),
    (("response/length_mean", "len"),),
)


def fmt_number(value: float | None) -> str:
    """Compact human formatting: 3 significant digits, no exponent below 1e6 (``0.412``, ``0.0021``, ``1234``)."""
    if value is None:
        return "-"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-4):
        return f"{value:.2e}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def format_step_line(step: int, metrics: Mapping[str, float | None], total_steps: int | None = None) -> str:
    """``step 12/50 | reward 0.412 acc 0.38 | kl 0.0021 | len 9.8 | 3.1s (gen 1.2 score 0.3 ...)``.

    Only the metrics present are shown; ``timing/step_s`` is the total, every other ``timing/<phase>_s`` is listed
    in the order it appears in ``metrics``.
    """
    parts = [f"step {step}/{total_steps}" if total_steps else f"step {step}"]
    for section in _SECTIONS:
        shown = [f"{label} {fmt_number(metrics[key])}" for key, label in section if key in metrics]
        if shown:
            parts.append(" ".join(shown))
    phases = " ".join(
        f"{key[len('timing/'):-len('_s')]} {fmt_number(value)}"
        for key, value in metrics.items()
        if key.startswith("timing/") and key.endswith("_s") and key != "timing/step_s"
    )
    total = metrics.get("timing/step_s")
    if total is not None and phases:
        parts.append(f"{fmt_number(total)}s ({phases})")
    elif total is not None:
        parts.append(f"{fmt_number(total)}s")
    elif phases:
        parts.append(f"time ({phases})")
    return " | ".join(parts)


def write_line(text: str, file: TextIO | None = None) -> None:
    """Print one line, moving a live TTY progress bar (if any) below it."""
    stream = file if file is not None else sys.stdout
    bars = [bar for bar in _active_bars if bar.file is stream]
    if bars:
        stream.write("\r\x1b[K")
    stream.write(text + "\n")
    for bar in bars:
        bar.redraw()
    stream.flush()
