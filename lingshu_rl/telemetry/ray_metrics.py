"""Step metrics as Ray custom metrics (Prometheus text on the metrics agent's port), and ``ray.init`` options.

How it works (Ray 2.60): ``ray.util.metrics.Gauge`` objects set in *any* Ray process - including the driver -
are recorded by that process's core worker and pushed to the node's metrics agent every
``max(metrics_report_interval_ms, 1000)`` ms; the agent serves them in Prometheus text at
``http://<node>:<metrics_export_port>/metrics`` with the ``ray_`` namespace prefix, e.g.
``ray_lingshu_reward_mean{...,run="my-run"} 0.412``. The agent keeps a gauge's value while its process keeps
re-reporting it (the driver does, every interval), so no helper actor is needed: gauges are set from the driver.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "lingshu"
PROMETHEUS_NAMESPACE = "ray"  # prepended by Ray's exporter: lingshu_reward_mean -> ray_lingshu_reward_mean


def metric_name(key: str) -> str:
    """Ray metric name for a metrics key: ``reward/mean`` -> ``lingshu_reward_mean``."""
    body = re.sub(r"[^A-Za-z0-9_]+", "_", key).strip("_")
    return f"{PREFIX}_{re.sub(r'_+', '_', body) or 'metric'}"


def prometheus_name(key: str) -> str:
    """The name as it appears in Prometheus text: ``reward/mean`` -> ``ray_lingshu_reward_mean``."""
    return f"{PROMETHEUS_NAMESPACE}_{metric_name(key)}"


def ray_init_options(
    dashboard_host: str = "127.0.0.1",
    dashboard_port: int | None = 8265,
    metrics_export_port: int | None = None,
    include_dashboard: bool = True,
    *,
    metrics_report_interval_ms: int = 1000,
) -> dict[str, Any]:
    """Keyword arguments for ``ray.init`` when *starting* a local cluster (not for ``address=...``: Ray rejects
    ``_system_config`` when connecting to an existing one).

    - the dashboard binds ``dashboard_host`` (loopback by default; reach it remotely with an SSH tunnel);
    - the Prometheus endpoint listens on ``metrics_export_port`` (``None``: a free port Ray picks; read it back
      with :func:`metrics_endpoint`). Note: on Linux Ray binds it on all interfaces (it uses loopback only when
      the node IP itself is loopback, and Ray maps a ``127.0.0.1`` node IP to the real one), so it is reachable
      at ``127.0.0.1:<port>`` but also from the network unless firewalled;
    - metrics are pushed to that endpoint every ``metrics_report_interval_ms`` (Ray's default is 10 s; Ray
      floors the interval at 1 s).
    """
    options: dict[str, Any] = {
        "include_dashboard": include_dashboard,
        "dashboard_host": dashboard_host,
        "_system_config": {"metrics_report_interval_ms": int(metrics_report_interval_ms)},
    }
    if dashboard_port is not None:
        options["dashboard_port"] = int(dashboard_port)
    if metrics_export_port is not None:
        options["_metrics_export_port"] = int(metrics_export_port)
    return options


def metrics_endpoint(host: str = "127.0.0.1") -> str | None:
    """``http://127.0.0.1:<port>/metrics`` of this node's Ray metrics agent, or ``None`` if Ray isn't running."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        port = ray._private.worker.global_worker.node.metrics_export_port
    except AttributeError:  # Ray client mode: no local node
        return None
    return f"http://{host}:{port}/metrics" if port and port > 0 else None


class RayGauges:
    """One ``ray.util.metrics.Gauge`` per metrics key (created lazily), tagged ``run=<run name>``.

    A no-op while Ray is not initialised in this process (checked on every call, so Ray may start later);
    a failure to record is logged once and never raised.
    """

    def __init__(self, run: str) -> None:
        self.run = run
        self._gauges: dict[str, Any] = {}
        self._warned = False

    def set(self, metrics: Mapping[str, float | None]) -> bool:
        """Set a gauge per finite metric; returns whether Ray was available."""
        ray = sys.modules.get("ray")  # never import Ray just for this
        if ray is None or not ray.is_initialized():
            return False
        try:
            from ray.util.metrics import Gauge

            for key, value in metrics.items():
                if value is None or not math.isfinite(value):
                    continue
                name = metric_name(key)
                gauge = self._gauges.get(name)
                if gauge is None:
                    gauge = Gauge(name, description=f"lingshu_rl step metric {key}", tag_keys=("run",))
                    self._gauges[name] = gauge
                gauge.set(float(value), tags={"run": self.run})
        except Exception as exc:  # noqa: BLE001 - telemetry must never stop a training run
            if not self._warned:
                logger.warning("Ray metrics export failed (%s: %s)", type(exc).__name__, exc)
                self._warned = True
            return False
        return True
