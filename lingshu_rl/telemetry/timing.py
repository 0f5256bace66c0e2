"""Per-step phase timing: ``with timer.phase("gen"): ...`` then ``timer.metrics()``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase of one training step.

    ``reset()`` starts a new step (construction does too). ``metrics()`` returns ``timing/<phase>_s`` for each
    phase entered since the last reset (a phase entered twice is summed) plus ``timing/step_s``, the wall time
    since the last reset (so it includes time spent outside any phase).
    """

    def __init__(self) -> None:
        self._phases: dict[str, float] = {}
        self._start = time.perf_counter()

    def reset(self) -> None:
        """Forget all phases and restart the step clock."""
        self._phases = {}
        self._start = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body under ``name``; the time is recorded even if the body raises."""
        if not name or name == "step":
            raise ValueError(f"invalid phase name {name!r} ('step' is reserved for the step total)")
        start = time.perf_counter()
        try:
            yield
        finally:
            self._phases[name] = self._phases.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        """``{"timing/<phase>_s": seconds, ..., "timing/step_s": seconds since reset}`` in phase order."""
        out = {f"timing/{name}_s": seconds for name, seconds in self._phases.items()}
        out["timing/step_s"] = time.perf_counter() - self._start
        return out
