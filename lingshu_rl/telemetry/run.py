"""``Telemetry``: the one object a training loop talks to; fans each step out to every sink."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from lingshu_rl.telemetry.console import format_step_line, write_line
from lingshu_rl.telemetry.jsonl import JsonlWriter, read_jsonl
from lingshu_rl.telemetry.plots import plot_reward_curve
from lingshu_rl.telemetry.ray_metrics import RayGauges
from lingshu_rl.telemetry.redact import without_text
from lingshu_rl.telemetry.wandb_log import WandbConfig, WandbRun

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
CURVE_FILE = "reward_curve.png"


def _as_float(value: Any) -> float | None:
    """A metric as a float (numpy/torch scalars included); ``None`` for NaN/inf; raises for non-numbers."""
    number = float(value.item() if hasattr(value, "item") else value)
    return number if math.isfinite(number) else None


class Telemetry:
    """Per-run logging: ``OUTPUT_DIR/metrics.jsonl`` (source of truth), ``samples.jsonl``, wandb, Ray gauges,
    one console line per step, and ``reward_curve.png`` on :meth:`close`.

    Args:
        output_dir: run directory (created if missing).
        config: the run's config; logged to wandb with secret-looking keys redacted (see ``redact``).
        wandb: wandb settings (default: offline run under ``OUTPUT_DIR/wandb``).
        ray_metrics: export step metrics as Ray gauges when Ray is initialised in this process.
        console: print one summary line per step to stdout.
        resume_step: resuming from a checkpoint at this step: rows with ``step > resume_step`` are dropped from
            metrics.jsonl and samples.jsonl on open (so re-run steps are not duplicated) and the previous wandb
            run id is reused. ``None``: a fresh run (existing files are appended to, a new wandb run starts).
        total_steps: shown as ``step 12/50`` in the console line.
        run_name: the Ray gauges' ``run`` tag; default ``wandb.run_name`` or the output directory's name.
        stream: console stream (default ``sys.stdout``).
        redact_text: keep prompts, responses and answers out of samples.jsonl (ids, rewards, lengths stay).
    """

    def __init__(
        self,
        output_dir: str | Path,
        config: Mapping[str, Any] | None = None,
        wandb: WandbConfig | None = None,
        ray_metrics: bool = True,
        console: bool = True,
        *,
        resume_step: int | None = None,
        total_steps: int | None = None,
        run_name: str | None = None,
        stream: TextIO | None = None,
        redact_text: bool = False,
    ) -> None:
        self.redact_text = redact_text
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.wandb_config = wandb if wandb is not None else WandbConfig()
        self.console = console
        self.total_steps = total_steps
        self.stream = stream
        self.run_name = run_name or self.wandb_config.run_name or self.output_dir.resolve().name
        self.metrics_path = self.output_dir / METRICS_FILE
        self.samples_path = self.output_dir / SAMPLES_FILE
        self.curve_path = self.output_dir / CURVE_FILE
        self._metrics = JsonlWriter(self.metrics_path, keep_through_step=resume_step)
        self._samples = JsonlWriter(self.samples_path, keep_through_step=resume_step)
        self._gauges = RayGauges(self.run_name) if ray_metrics else None
        self.wandb = WandbRun(self.wandb_config, self.output_dir, dict(config or {}), resume=resume_step is not None)
        self._non_numeric: set[str] = set()
        self._closed = False

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float | None]:
        """Record one step's metrics everywhere; returns the row written (``step`` + floats, NaN/inf as None).

        Non-numeric values are skipped with a warning. The metrics.jsonl row is on disk (fsync'd) before
        wandb, Ray or the console see it.
        """
        clean: dict[str, float | None] = {}
        for key, value in metrics.items():
            if key == "step":
                continue
            try:
                clean[str(key)] = _as_float(value)
            except (TypeError, ValueError):
                if key not in self._non_numeric:
                    self._non_numeric.add(key)
                    logger.warning("metric %r is not a number (%r); not logged (warned once)", key, value)
        row = {"step": int(step), **clean}
        self._metrics.write(row)
        finite = {key: value for key, value in clean.items() if value is not None}
        self.wandb.log(int(step), finite)
        if self._gauges is not None:
            self._gauges.set({"step": float(step), **finite})
        if self.console:
            write_line(format_step_line(int(step), clean, self.total_steps), self.stream)
        return row

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append generations (prompt, response, reward, ...) to samples.jsonl, each row tagged with ``step``."""
        rows = [without_text(row) if self.redact_text else row for row in rows]
        self._samples.write_many({"step": int(step), **{k: v for k, v in row.items() if k != "step"}} for row in rows)

    def close(self) -> None:
        """Write reward_curve.png (from the whole metrics.jsonl, resumed history included), close the files and
        finish the wandb run. Safe to call twice; a plotting failure is logged, not raised."""
        if self._closed:
            return
        self._closed = True
        self._metrics.close()
        self._samples.close()
        try:
            plot_reward_curve(read_jsonl(self.metrics_path), self.curve_path, title=f"{self.run_name}: reward")
        except Exception as exc:  # noqa: BLE001 - never lose the wandb finish to a plotting problem
            logger.warning("could not write %s (%s: %s)", self.curve_path, type(exc).__name__, exc)
        self.wandb.finish()

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
