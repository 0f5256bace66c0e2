"""Run telemetry: metrics.jsonl / samples.jsonl, wandb (offline by default), Ray Prometheus gauges, console
step lines and progress bars, phase timing, and the reward-curve plot.

Modules: ``run`` (Telemetry), ``jsonl``, ``wandb_log``, ``ray_metrics``, ``console``, ``progress``, ``timing``,
``plots``, ``redact``. Heavy dependencies (wandb, Ray, matplotlib) are imported only when used.
"""

from lingshu_rl.telemetry.console import format_step_line
from lingshu_rl.telemetry.progress import Progress
from lingshu_rl.telemetry.ray_metrics import metric_name, metrics_endpoint, prometheus_name, ray_init_options
from lingshu_rl.telemetry.redact import redact
from lingshu_rl.telemetry.run import Telemetry
from lingshu_rl.telemetry.timing import PhaseTimer
from lingshu_rl.telemetry.wandb_log import WandbConfig

__all__ = [
    "PhaseTimer",
    "Progress",
    "Telemetry",
    "WandbConfig",
    "format_step_line",
    "metric_name",
    "metrics_endpoint",
    "prometheus_name",
    "ray_init_options",
    "redact",
]
