"""The megatron engine at DP=2 x TP=1 over gloo: the optimiser state whole on each replica or split over them
(``train.distributed_optimizer``), per rank: bytes held between updates (parameters, float32 main copies, Adam
moments), peak RSS and seconds per update; float32 and bfloat16 models.

    python benchmarks/megatron_optimizer.py                 # the 50m model (~5 minutes on 2 cores: bf16 is slow there)
    python benchmarks/megatron_optimizer.py --size tiny

Each configuration runs in fresh processes, one per rank. Prints the machine's load before each row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import random_models  # benchmarks/random_models.py (scripts run from their folder)
import torch
from train_scaling import SIZES, batch, free_port, rss_mb, spawn

UPDATES = 4


def held_bytes(engine) -> int:
    """This rank's parameters, float32 main copies and optimiser moments, each storage once."""
    optim = engine.optim
    tensors = list(engine.model.parameters()) + [m for m in optim.main if m is not None]
    tensors += [v for state in optim.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def rank_main(rank: int, port: int, path: str, dtype: str, split: bool, out: dict) -> None:
    from lingshu_rl.config import ModelConfig, TrainConfig
    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.train.megatron.engine import MegatronEngine
    from lingshu_rl.train.split import plan_updates

    torch.set_num_threads(1)
    cfg = TrainConfig(engine="megatron", data_parallel_size=2, distributed_optimizer=split, lr=1e-5,
                      micro_batch_size=4, device="cpu")
    engine = MegatronEngine(path, ModelConfig(dtype=dtype), cfg, total_steps=UPDATES, rank=rank, master_port=port)
    work = plan_updates(batch(32, 32), 1, 2, cfg.micro_batch_size)[rank]
    seconds = []
    for _ in range(UPDATES):
        start = time.perf_counter()
        engine.update(work, GRPOLoss())
        seconds.append(time.perf_counter() - start)
    params = sum(p.numel() for p in engine.model.parameters())
    out[rank] = {"s": statistics.median(seconds[1:]), "held": held_bytes(engine), "peak": rss_mb(), "params": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="50m", choices=sorted(SIZES))
    args = parser.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # the ranks' megatron start-up warnings (no Apex, ...)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    print(f"megatron DP=2 x TP=1 over gloo, {args.size} model, 8 sequences x (32 + 32) tokens per update, "
          f"micro-batch 4, AdamW; median of {UPDATES - 1} updates after one warm-up; worst rank")
    print("| dtype | optimiser state | held MB per rank | bytes per parameter | peak RSS MB per rank | s/update "
          "| load before |\n|---|---|--:|--:|--:|--:|--:|")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            path = random_models.build(f"{args.size}-{dtype}", SIZES[args.size], Path(tmp), getattr(torch, dtype))
            held = {}
            for split in (False, True):
                load = os.getloadavg()[0]
                res = spawn(rank_main, 2, free_port(), path, dtype, split)
                worst = {key: max(r[key] for r in res.values()) for key in ("s", "held", "peak")}
                held[split] = worst["held"]
                print(f"| {dtype} | {'split' if split else 'whole'} | {worst['held'] / 2**20:,.0f} | "
                      f"{worst['held'] / res[0]['params']:.1f} | {worst['peak']:,.0f} | {worst['s']:.3f} | "
                      f"{load:.1f}{' (loaded)' if load > 1.5 else ''} |", flush=True)
            print(f"  {dtype}: held per rank, split / whole: {held[True] / held[False]:.2f}", flush=True)


if __name__ == "__main__":
    main()
