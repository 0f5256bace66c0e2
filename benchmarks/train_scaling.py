"""Training at DP=1 and DP=2 (FSDP2 over gloo): peak memory per rank and seconds per update, for three sizes of a
random-init Qwen2 model; and the peak memory of one update with long prompts, full logits vs response-only.

    python benchmarks/train_scaling.py                  # all rows (a few minutes on 2 cores)
    python benchmarks/train_scaling.py --sizes tiny,50m
    python benchmarks/train_scaling.py --sizes 200m --release-freed    # RSS without glibc's retained blocks

Every configuration runs in fresh processes (one per rank), so peak RSS is its own. "model MB" is peak RSS minus
the process's RSS just before the model was loaded (interpreter, torch and transformers excluded). "tensor MB" is
the peak of live tensor memory during one more (profiled) update: what ``torch.cuda.max_memory_allocated`` reports
on a GPU, free of what the host allocator keeps after a free. Prints the machine's load with each row: figures
from a loaded machine are not comparable (the load before each row includes the row before it).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path

import random_models  # benchmarks/random_models.py (scripts run from their folder)
import torch
import torch.multiprocessing as mp

SIZES = {  # name: (hidden, layers, heads, kv heads, intermediate, vocab); untied embeddings, as Qwen2.5-7B's
    "tiny": None,  # the embedded demo model (~1.1M parameters)
    "50m": (640, 8, 10, 2, 1728, 32000),
    "200m": (1024, 12, 16, 4, 2816, 32000),
}
ROWS, PROMPT, RESPONSE, UPDATES = 8, 32, 32, 3


def build(size: str, root: Path) -> str:
    return random_models.build(size, SIZES[size], root)


def batch(prompt: int, response: int, rows: int = ROWS, vocab: int = 400):
    from lingshu_rl.train.batch import collate

    gen = torch.Generator().manual_seed(0)
    b = collate([torch.randint(3, vocab, (prompt,), generator=gen).tolist() for _ in range(rows)],
                [torch.randint(3, vocab, (response,), generator=gen).tolist() for _ in range(rows)], pad_id=0)
    return b.with_(advantages=torch.randn(rows, generator=gen))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def held_tensor_bytes(engine) -> int:
    """Bytes of this rank's parameters, gradients and optimizer state (its shards under FSDP2), each storage once."""
    params = list(engine.lm.parameters())
    tensors = params + [p.grad for p in params if p.grad is not None]
    tensors += [v for state in engine.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {}
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def peak_tensor_mb(engine, work, loss) -> float:
    """Peak live tensor memory during one update: what is held before it, plus the highest running sum of the
    allocations and frees the profiler records on the way (torch's CPU allocator reports each one)."""
    from torch.profiler import ProfilerActivity, profile

    held = held_tensor_bytes(engine)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        engine.update(work, loss)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return (held + peak) / 2**20


def train_rank(rank: int, world: int, port: int, path: str, out: dict) -> None:
    from lingshu_rl.config import ModelConfig, TrainConfig
    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.train.fsdp import DistInfo
    from lingshu_rl.train.split import plan_updates
    from lingshu_rl.train.torch_engine import TorchEngine

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    before = current_rss_mb()
    cfg = TrainConfig(lr=1e-5, micro_batch_size=4, device="cpu", strategy="fsdp2" if world > 1 else "none",
                      data_parallel_size=world)
    engine = TorchEngine(path, ModelConfig(), cfg, total_steps=UPDATES,
                         dist_info=DistInfo(rank, world, "127.0.0.1", port) if world > 1 else None)
    work = plan_updates(batch(PROMPT, RESPONSE), 1, world, cfg.micro_batch_size)[rank]
    seconds = []
    for _ in range(UPDATES):
        start = time.perf_counter()
        engine.update(work, GRPOLoss())
        seconds.append(time.perf_counter() - start)
    params = sum(p.numel() for p in engine.lm.parameters()) if world == 1 else None
    peak = rss_mb()  # before profiling: the profiler's own records take memory
    out[rank] = {"s": statistics.median(seconds[1:]), "peak": peak, "model": peak - before, "params": params,
                 "tensors": peak_tensor_mb(engine, work, GRPOLoss())}


def logits_rank(_: int, mode: str, path: str, out: dict) -> None:
    """One update with 1,024-token prompts and 64-token responses: full logits (as before) or response-only."""
    from lingshu_rl.config import ModelConfig, TrainConfig
    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.train.logprob import token_logprobs
    from lingshu_rl.train.torch_engine import TorchEngine

    engine = TorchEngine(path, ModelConfig(), TrainConfig(lr=1e-5, micro_batch_size=4, device="cpu"))
    if mode == "full":  # the engine's forward as it was: logits over every position and the whole vocabulary
        def full_forward(micro, temperature, with_entropy):
            inputs = engine._inputs(micro)
            logits = engine.lm(input_ids=micro.input_ids, **inputs).logits
            return token_logprobs(logits, micro.input_ids, temperature) * micro.response_mask, None

        engine.forward = full_forward  # type: ignore[method-assign]
    before = current_rss_mb()
    engine.update(batch(1024, 64, rows=4), GRPOLoss())
    out[mode] = rss_mb() - before


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(fn, nprocs: int, *args) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(fn, args=(*args, out), nprocs=nprocs, start_method="spawn")
        return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--release-freed", action="store_true",
                        help="glibc returns freed blocks of 128 KB and more to the system at once "
                             "(MALLOC_MMAP_THRESHOLD_=131072 in every rank): RSS then follows live memory")
    args = parser.parse_args()
    if args.release_freed:  # read by glibc when a process starts: the spawned ranks inherit it
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    print(f"allocator: glibc, MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'default')}")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{ROWS} sequences x ({PROMPT} prompt + {RESPONSE} response) tokens, micro-batch 4, GRPO loss, "
              f"AdamW, float32; median of {UPDATES - 1} updates after one warm-up")
        print("| model | params | DP | s/update | peak RSS MB per rank | model MB per rank | tensor MB per rank "
              "| load before |\n|---|--:|--:|--:|--:|--:|--:|--:|")
        for size in args.sizes.split(","):
            path = build(size, Path(tmp))
            results = {}
            for world in (1, 2):
                load = os.getloadavg()[0]
                res = spawn(train_rank, world, world, free_port(), path)
                results[world] = res
                params = results[1][0]["params"]
                worst = {key: max(r[key] for r in res.values()) for key in ("s", "peak", "model", "tensors")}
                print(f"| {size} | {params / 1e6:.1f}M | {world} | {worst['s']:.3f} | {worst['peak']:,.0f} | "
                      f"{worst['model']:,.0f} | {worst['tensors']:,.0f} | {load:.1f}"
                      f"{' (loaded)' if load > 1.5 else ''} |", flush=True)
            ratios = {key: max(r[key] for r in results[2].values()) / results[1][0][key]
                      for key in ("model", "tensors")}
            print(f"  {size}: per rank, DP=2 / DP=1: model RSS {ratios['model']:.2f}, "
                  f"tensors {ratios['tensors']:.2f}", flush=True)
        path = build("50m", Path(tmp)) if "50m" not in args.sizes else str(Path(tmp) / "50m")
        memory = {mode: spawn(logits_rank, 1, mode, path)[mode]
                  for mode in ("full", "response")}
        print(f"one update, 4 x (1,024 prompt + 64 response) tokens, 50m model (vocab 32,000): extra peak RSS "
              f"{memory['full']:,.0f} MB with full logits, {memory['response']:,.0f} MB response-only "
              f"({memory['response'] / memory['full']:.2f}x)")


if __name__ == "__main__":
    main()
