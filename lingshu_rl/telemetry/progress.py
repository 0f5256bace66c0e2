"""A dependency-free console progress bar: redrawn in place on a TTY, throttled plain lines otherwise (logs)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from lingshu_rl.telemetry import console


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _is_tty(file: TextIO) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """``with Progress(total=N, desc="grpo") as bar: bar.update(1, postfix="reward 0.31")``.

    On a TTY the bar is one line redrawn with ``\\r`` (``grpo  24%|#######.......| 12/50 [0:37<1:57] reward 0.31``).
    When ``file`` is not a TTY (redirected to a log) each update prints a plain line instead, at most one per
    ``min_interval_s`` seconds, and always the last one (``n == total``) and on close if anything was not shown.
    ``total=None`` shows a count without percentage or ETA.
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        *,
        file: TextIO | None = None,
        width: int = 24,
        min_interval_s: float = 1.0,
    ) -> None:
        self.total = total
        self.desc = desc
        self.file = file if file is not None else sys.stdout
        self.width = width
        self.min_interval_s = min_interval_s
        self.n = 0
        self.postfix = ""
        self.tty = _is_tty(self.file)
        self._start = time.monotonic()
        self._last_print = float("-inf")
        self._unprinted = False
        self._closed = False
        if self.tty:
            console._active_bars.append(self)
            self.redraw()

    def render(self) -> str:
        """The bar's current text (without control characters)."""
        elapsed = time.monotonic() - self._start
        head = f"{self.desc} " if self.desc else ""
        if self.total:
            frac = min(1.0, self.n / self.total)
            eta = elapsed * (self.total - self.n) / self.n if self.n else 0.0
            timing = f"[{_clock(elapsed)}<{_clock(eta)}]" if self.n else f"[{_clock(elapsed)}]"
            if self.tty:
                filled = int(round(frac * self.width))
                bar = "#" * filled + "." * (self.width - filled)
                text = f"{head}{frac:4.0%}|{bar}| {self.n}/{self.total} {timing}"
            else:
                text = f"{head}{self.n}/{self.total} ({frac:.0%}) {timing}"
        else:
            text = f"{head}{self.n} [{_clock(elapsed)}]"
        return f"{text} {self.postfix}".rstrip()

    def redraw(self) -> None:
        """Repaint the bar in place (TTY only)."""
        if self.tty and not self._closed:
            self.file.write("\r\x1b[K" + self.render())
            self.file.flush()

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        """Advance by ``n`` and optionally replace the trailing text."""
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        if self.tty:
            self.redraw()
            return
        now = time.monotonic()
        done = self.total is not None and self.n >= self.total
        if done or now - self._last_print >= self.min_interval_s:
            self._print_plain(now)
        else:
            self._unprinted = True

    def _print_plain(self, now: float) -> None:
        self.file.write(self.render() + "\n")
        self.file.flush()
        self._last_print = now
        self._unprinted = False

    def close(self) -> None:
        """Finish the bar line (TTY) or print the final state if it was throttled away."""
        if self._closed:
            return
        if self.tty:
            self.redraw()
            self.file.write("\n")
            self.file.flush()
            console._active_bars.remove(self)
        elif self._unprinted:
            self._print_plain(time.monotonic())
        self._closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
