"""Start a local Ray cluster, or join one only when asked (``--ray-address`` / ``cluster.address``).

``ray.init()`` without an address follows Ray's own discovery (``RAY_ADDRESS``, the newest cluster file under
Ray's temp dir), so what the default command did would depend on what else ran on the machine. The launcher
therefore always passes ``address="local"`` unless told to join, and says what it did.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import psutil
import ray

from lingshu_rl.config import ClusterConfig
from lingshu_rl.telemetry import ray_init_options

WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


STARTUP_ATTEMPTS = 3
T = TypeVar("T")


def retry_node_startup(start: Callable[[], T]) -> T:
    """``start()`` - a call that starts a Ray node on this machine - tried again when the node's start-up times out.

    Ray gives a new raylet a fixed 30 s to register with the GCS (not configurable in Ray 2.60). A busy machine -
    a 2-core laptop while another job runs - can miss that, and a run would die before its first step. A failed
    attempt leaves its processes (GCS, raylet, dashboard) running, so they are stopped before the next attempt.
    """
    for attempt in range(1, STARTUP_ATTEMPTS):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            return start()
        except Exception as err:
            if "timed out during startup" not in str(err):
                raise
            started = [c for c in psutil.Process().children(recursive=True) if c.pid not in before]
            for child in started:
                with contextlib.suppress(psutil.NoSuchProcess):  # it may have exited meanwhile
                    child.kill()
            psutil.wait_procs(started, timeout=10)
            print(f"[lingshu] a Ray node's start-up timed out (attempt {attempt} of {STARTUP_ATTEMPTS}; is the "
                  f"machine busy?): stopped its {len(started)} processes, starting it again", flush=True)
    return start()


def init_local_ray(**options: Any) -> Any:
    """``ray.init(address="local", **options)``, with :func:`retry_node_startup`."""
    return retry_node_startup(lambda: ray.init(address="local", **options))


def start_ray(cfg: ClusterConfig, namespace: str) -> dict[str, Any]:
    """Join ``cfg.address``, or start a local cluster whose dashboard listens on ``cfg.dashboard_host`` only.

    Joining passes no start-up options (Ray rejects them for an existing cluster). Returns the dashboard URL.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine unless asked
    runtime_env = {"env_vars": WORKER_ENV}
    if cfg.address:
        context = ray.init(address=cfg.address, namespace=namespace, runtime_env=runtime_env, log_to_driver=True)
        print(f"[lingshu] joined the Ray cluster at {cfg.address} ({ray.cluster_resources().get('CPU', 0):g} CPUs, "
              f"{ray.cluster_resources().get('GPU', 0):g} GPUs, {len(ray.nodes())} node(s))", flush=True)
        return {"dashboard_url": getattr(context, "dashboard_url", None)}

    ignored = os.environ.pop("RAY_ADDRESS", None)  # nor do this driver's child processes inherit it
    port = cfg.dashboard_port
    if cfg.include_dashboard and not port_is_free(cfg.dashboard_host, port):
        port = free_port(cfg.dashboard_host)
        print(f"[lingshu] port {cfg.dashboard_port} on {cfg.dashboard_host} is taken (another Ray dashboard?); "
              f"this run's dashboard uses port {port}", flush=True)
    options = ray_init_options(cfg.dashboard_host, port, cfg.metrics_export_port, cfg.include_dashboard)
    context = init_local_ray(num_cpus=cfg.num_cpus, namespace=namespace, runtime_env=runtime_env, **options)
    note = (f"; RAY_ADDRESS={ignored} is set but was not used: pass --ray-address {ignored} to join that cluster"
            if ignored else "")
    print(f"[lingshu] started a local Ray cluster ({ray.cluster_resources().get('CPU', 0):g} CPUs){note}", flush=True)
    return {"dashboard_url": getattr(context, "dashboard_url", None)}
