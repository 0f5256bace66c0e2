"""Weights & Biases logging: offline by default (a real run directory under OUTPUT_DIR/wandb, no network)."""

from __future__ import annotations

import logging
import os
import secrets
import string
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lingshu_rl.telemetry.redact import redact, redact_argv

logger = logging.getLogger(__name__)

WandbMode = Literal["offline", "online", "disabled"]
MODES: tuple[WandbMode, ...] = ("offline", "online", "disabled")
RUN_ID_FILE = "run_id"  # OUTPUT_DIR/wandb/run_id: lets a resumed run continue the same wandb run


@dataclass
class WandbConfig:
    """How (and whether) a run is logged to Weights & Biases."""

    mode: str = "offline"
    """``offline``: write a local run under ``OUTPUT_DIR/wandb`` (upload later with ``wandb sync``), never touching
    the network. ``online``: stream to the server; needs ``WANDB_API_KEY`` in the environment (without it the run
    falls back to offline with a warning). ``disabled``: no wandb at all."""
    project: str = "lingshu_rl"
    """wandb project name."""
    entity: str | None = None
    """wandb team or user; ``None`` uses the API key's default entity."""
    run_name: str | None = None
    """Display name of the run; ``None`` lets wandb pick one. Also used as the ``run`` tag of the Ray metrics."""
    tags: list[str] = field(default_factory=list)
    """Free-form run tags."""

    def __post_init__(self) -> None:
        _as_mode(self.mode)


def _as_mode(name: str) -> WandbMode:
    """``name`` as one of :data:`MODES`; a ``ValueError`` for any other."""
    for mode in MODES:
        if name == mode:
            return mode
    raise ValueError(f"wandb mode must be one of {MODES}, got {name!r}")


def new_run_id() -> str:
    """A wandb-style run id (8 lowercase letters/digits; wandb 0.31 no longer exports ``wandb.util.generate_id``)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _settings(wandb_module: Any) -> Any:
    # console="off": wandb must not hijack/wrap stdout/stderr (our console lines and progress bars own them);
    # silent: no "wandb: ..." banners. Both exist in wandb 0.31's pydantic Settings.
    return wandb_module.Settings(console="off", silent=True)


class WandbRun:
    """One wandb run (or nothing, when disabled or when wandb failed to start: metrics.jsonl stays complete)."""

    def __init__(
        self, cfg: WandbConfig, output_dir: Path, config: Mapping[str, Any], *, resume: bool = False
    ) -> None:
        self.cfg = cfg
        self.mode = cfg.mode
        self.run: Any = None
        self._warned = False
        if self.mode == "disabled":
            return
        if self.mode == "online" and not os.environ.get("WANDB_API_KEY"):
            logger.warning("wandb mode 'online' needs WANDB_API_KEY in the environment; logging offline instead")
            self.mode = "offline"
        import wandb

        wandb_dir = output_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        id_file = wandb_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.exists() else ""
        if not run_id:
            run_id = new_run_id()
            id_file.write_text(run_id + "\n")
        # An online run that cannot start (network, bad key) is retried offline so nothing is lost.
        for mode in [self.mode, "offline"] if self.mode == "online" else [self.mode]:
            if mode == "offline":
                # wandb 0.31 still phones home in offline runs: its process-wide usage-telemetry recorder is built
                # from the global (online) settings and POSTs to <base_url>/sdk/otel/... from a thread at exit.
                # WANDB_ERROR_REPORTING=false turns that (and crash reporting) off; process-wide.
                os.environ["WANDB_ERROR_REPORTING"] = "false"
            argv = sys.argv
            sys.argv = redact_argv(argv)  # wandb records the command line in the run's metadata
            try:
                self.run = wandb.init(
                    project=cfg.project,
                    entity=cfg.entity,
                    name=cfg.run_name,
                    tags=list(cfg.tags) or None,
                    config=redact(dict(config)),
                    dir=str(output_dir),
                    id=run_id,
                    resume="allow",
                    mode=_as_mode(mode),
                    reinit="create_new",
                    settings=_settings(wandb),
                )
                # Plot everything against our own ``step`` so a resumed run can re-log steps without wandb's
                # "step must increase monotonically" drops.
                self.run.define_metric("step")
                self.run.define_metric("*", step_metric="step")
                self.mode = mode
                return
            except Exception as exc:  # noqa: BLE001 - telemetry must never stop a training run
                logger.warning("wandb %s init failed (%s: %s)", mode, type(exc).__name__, exc)
                self.run = None
            finally:
                sys.argv = argv
        logger.warning("continuing without wandb (metrics.jsonl still has every step)")

    @property
    def run_dir(self) -> Path | None:
        """The run's directory (``.../wandb/offline-run-<date>-<id>`` offline), or ``None``."""
        return Path(self.run.dir).parent if self.run is not None else None

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.log({"step": step, **metrics})
        except Exception as exc:  # noqa: BLE001
            if not self._warned:
                logger.warning("wandb log failed (%s: %s); further failures are silent", type(exc).__name__, exc)
                self._warned = True

    def finish(self) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run_dir = Path(run.dir).parent
            run.finish()
            _flush_if_last_run()
            _wait_for_transaction_log(run_dir)
        except Exception as exc:  # noqa: BLE001
            logger.warning("wandb finish failed (%s: %s)", type(exc).__name__, exc)


def _flush_if_last_run() -> None:
    """Make the finished run's files complete now, not at interpreter exit.

    wandb 0.31's ``run.finish()`` returns before wandb-core has written the run's transaction log (the
    ``run-<id>.wandb`` file can still be a 7-byte header right after it); only ``wandb.teardown()`` waits for that.
    Teardown would also finish any other open run, so it is called only when no other run is active.
    """
    import wandb
    from wandb.sdk import wandb_setup

    most_recent = getattr(wandb_setup.singleton(), "most_recent_active_run", None)
    if most_recent is not None and most_recent() is None:
        wandb.teardown()


def _wait_for_transaction_log(run_dir: Path, timeout_s: float = 30.0) -> None:
    """Wait (bounded) until wandb-core has written past the ``run-<id>.wandb`` header and stopped growing.

    On a loaded machine the writer can lag behind ``finish``/``teardown``; a run directory handed back to the user
    should hold its records.
    """
    deadline = time.monotonic() + timeout_s
    last_size = -1
    while time.monotonic() < deadline:
        sizes = [p.stat().st_size for p in run_dir.glob("run-*.wandb")]
        size = sum(sizes)
        if sizes and size > 64 and size == last_size:
            return
        last_size = size
        time.sleep(0.25)
