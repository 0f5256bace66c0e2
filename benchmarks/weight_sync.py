"""Seconds and extra peak memory per weight sync, Ray's object store vs the collective, for three model sizes.

    python benchmarks/weight_sync.py                          # tiny, 100m, 400m; a vLLM rollout worker
    python benchmarks/weight_sync.py --sizes tiny,100m --rollout transformers

One actor (the torch engine: float32 master weights, sent in ``model.dtype`` bfloat16) and one rollout worker on a
local Ray cluster, as ``train_grpo`` starts them. Each sync is timed from the driver until the rollout engine
holds the new weights (the canary check after it is timed apart). "+MB" is a process's peak RSS during the sync
above its RSS just before (Linux: VmHWM reset through /proc/self/clear_refs); the object store's own copy of the
state dict lives in Ray's shared memory on top of that. The floor is one memcpy of the same bytes in one process.
Prints the machine's load with each row: figures from a loaded machine are not comparable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import random_models  # benchmarks/random_models.py (scripts run from their folder)
import torch

SIZES = {  # name: (hidden, layers, heads, kv heads, intermediate, vocab); untied embeddings, as Qwen2.5-7B's
    "tiny": None,  # the embedded demo model (~1.1M parameters)
    "100m": (768, 12, 12, 2, 2048, 32000),
    "400m": (1024, 24, 16, 4, 4096, 32000),
}
REPEATS = 5
BUCKET_MB = 256  # rollout.sync_bucket_mb's default


def build(size: str, root: Path) -> str:
    return random_models.build(size, SIZES[size], root, torch.bfloat16)


def load() -> float:
    return os.getloadavg()[0]


def _reset_peak(_: Any) -> float:
    """Inside an actor: reset the peak RSS to the current RSS; returns the current RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _peak(_: Any) -> float:
    return _status("VmHWM")


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _biggest_layer_mb(path: str) -> float:
    """The largest per-layer (or embedding) share of the bfloat16 weights: what one gather holds at a time."""
    from safetensors import safe_open

    sizes: dict[str, int] = {}
    for file in Path(path).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                parts = name.split(".")
                key = ".".join(parts[:3]) if "layers" in parts else name
                shape = f.get_slice(name).get_shape()
                sizes[key] = sizes.get(key, 0) + 2 * int(torch.tensor(shape).prod())
    return max(sizes.values()) / 2**20


def measure(size: str, path: str, rollout_engine: str, bucket_mb: int) -> list[dict[str, Any]]:
    import ray

    from lingshu_rl.config import ModelConfig, RolloutConfig, RunConfig, TrainConfig
    from lingshu_rl.grpo.placement import Roles
    from lingshu_rl.grpo.sync import WeightSync
    from lingshu_rl.grpo.workers import PolicyWorker, RolloutWorker

    model = ModelConfig(dtype="bfloat16")
    train = TrainConfig(threads=1)
    rollout_cfg = RolloutConfig(engine=rollout_engine, sync_bucket_mb=bucket_mb)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}})
    rows = []
    try:
        actor = ray.remote(PolicyWorker).options(num_cpus=0).remote(path, model, train, 1, True, 0, 1)
        worker = ray.remote(RolloutWorker).options(num_cpus=0).remote(path, model, rollout_cfg, "cpu", 1)
        roles = Roles(actor, [worker], None, [])
        nbytes = sum(t.nbytes for t in ray.get(actor.weights.remote()).values())
        for method in ("object_store", "collective"):
            sync = WeightSync(roles, RunConfig(model=model, train=train,
                                               rollout=RolloutConfig(engine=rollout_engine, weight_sync=method,
                                                                     sync_bucket_mb=bucket_mb)), path)
            seconds, canary_s, extra_actor, extra_rollout, loads = [], [], [], [], []
            for _ in range(REPEATS):
                before = ray.get([h.__ray_call__.remote(_reset_peak) for h in (actor, worker)])
                loads.append(load())
                start = time.perf_counter()
                sync.transfer()
                seconds.append(time.perf_counter() - start)
                after = ray.get([h.__ray_call__.remote(_peak) for h in (actor, worker)])
                extra_actor.append(after[0] - before[0])
                extra_rollout.append(after[1] - before[1])
                start = time.perf_counter()
                diff = sync.check()["sync/canary_abs_diff"]
                canary_s.append(time.perf_counter() - start)
            rows.append({"size": size, "method": method, "mb": nbytes / 2**20, "s": statistics.median(seconds),
                         "actor_mb": max(extra_actor), "rollout_mb": max(extra_rollout),
                         "canary_s": statistics.median(canary_s), "canary_diff": diff, "load": max(loads)})
    finally:
        ray.shutdown()
    src = torch.empty(int(nbytes), dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    copies = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - start)
    rows.append({"size": size, "method": "memcpy floor", "mb": nbytes / 2**20, "s": statistics.median(copies),
                 "load": load(), "layer_mb": _biggest_layer_mb(path)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--rollout", default="vllm", choices=["vllm", "transformers"])
    parser.add_argument("--bucket-mb", type=int, default=BUCKET_MB)
    args = parser.parse_args()
    print(f"load average at start: {load():.2f} on {os.cpu_count()} CPUs; {REPEATS} syncs per row, medians; "
          f"buckets of {args.bucket_mb} MB; rollout engine: {args.rollout}", flush=True)
    header = ("| model | MB (bf16) | method | s / sync | x object store | actor +MB | rollout +MB | canary s "
              "| load |")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as root:
        for size in args.sizes.split(","):
            rows += measure(size, build(size, Path(root)), args.rollout, args.bucket_mb)
            print(f"  measured {size}", flush=True)
    print(header)
    print("|---|--:|---|--:|--:|--:|--:|--:|--:|")
    store = {r["size"]: r["s"] for r in rows if r["method"] == "object_store"}
    for r in rows:
        ratio = f"{r['s'] / store[r['size']]:.2f}"
        if r["method"] == "memcpy floor":
            print(f"| {r['size']} | {r['mb']:,.1f} | {r['method']} | {r['s']:.3f} | {ratio} | | | "
                  f"| {r['load']:.2f} |  (largest layer {r['layer_mb']:,.1f} MB)")
            continue
        print(f"| {r['size']} | {r['mb']:,.1f} | {r['method']} | {r['s']:.3f} | {ratio} | {r['actor_mb']:,.0f} "
              f"| {r['rollout_mb']:,.0f} | {r['canary_s']:.3f} | {r['load']:.2f} |")
    if max(r["load"] for r in rows) > 1.5:
        print("WARNING: the machine was loaded during some rows (load > 1.5 on 2 cores): figures are not comparable")


if __name__ == "__main__":
    main()
