"""GPU smoke test: the paths the CPU test suite cannot reach, in a few minutes on one CUDA GPU.

    python scripts/gpu_smoke.py            # after the README's install with a CUDA build of torch

1. The torch engine on CUDA in bf16 compute over float32 master weights: an update of lr 1e-6 moves the masters.
2. FSDP2 over NCCL (one rank: the process group, sharding, mixed precision, the sharded checkpoint round trip),
   then the same with ``train.offload`` (shards in pinned host memory, each layer copied to the GPU for its use).
3. The megatron engine over NCCL (one rank; when megatron-core is installed): bf16 compute on float32 main weights,
   an update, the checkpoint round trip of its optimiser state, a second update.
4. The launcher end to end on the GPU (SFT warm-up, 3 GRPO steps, evaluation) with the transformers rollout on the
   actor's GPU, its weights synced through CUDA IPC (``rollout.weight_sync=ipc``: an NCCL group cannot hold two
   ranks on one device) and checked by the canary after every sync.
Each prints PASS or raises. Not covered (needs 2+ GPUs or a vLLM CUDA build): DP=2 over NCCL, vLLM on GPU.
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def batch():
    from lingshu_rl.train.batch import collate

    gen = torch.Generator().manual_seed(0)
    b = collate([torch.randint(3, 300, (9,), generator=gen).tolist() for _ in range(8)],
                [torch.randint(3, 300, (7,), generator=gen).tolist() for _ in range(8)], pad_id=0)
    return b.with_(advantages=torch.randn(8, generator=gen))


def master_weights(path: str) -> None:
    from lingshu_rl.config import ModelConfig, TrainConfig
    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.train.torch_engine import TorchEngine

    engine = TorchEngine(path, ModelConfig(dtype="bfloat16"), TrainConfig(lr=1e-6, device="cuda"), total_steps=2)
    before = {n: p.detach().clone() for n, p in engine.lm.named_parameters()}
    engine.update(batch(), GRPOLoss())
    moved = [float((p.detach() != before[n]).float().mean()) for n, p in engine.lm.named_parameters()]
    assert all(p.dtype == torch.float32 for p in engine.params) and sum(moved) / len(moved) > 0.5, moved
    print("PASS bf16 compute on CUDA, float32 masters moved by lr 1e-6:", f"{sum(moved) / len(moved):.2f}")


def fsdp_nccl(path: str, root: Path, offload: bool) -> None:
    """In a process of its own (a process group per process)."""
    from lingshu_rl.config import ModelConfig, TrainConfig
    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.train.fsdp import DistInfo
    from lingshu_rl.train.torch_engine import TorchEngine

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = TrainConfig(lr=1e-4, device="cuda", strategy="fsdp2", gradient_checkpointing=True, offload=offload)
    engine = TorchEngine(path, ModelConfig(dtype="bfloat16"), cfg, total_steps=4,
                         dist_info=DistInfo(0, 1, "127.0.0.1", port))
    first = engine.update(batch(), GRPOLoss())
    engine.save(root / f"ckpt-{offload}")
    engine.load_training_state(root / f"ckpt-{offload}")
    second = engine.update(batch(), GRPOLoss())
    assert math.isfinite(first["actor/loss"]) and math.isfinite(second["actor/grad_norm"]), (first, second)
    where = {p.to_local().device.type for p in engine.params}
    assert where == ({"cpu"} if offload else {"cuda"}), where
    print(f"PASS FSDP2 over NCCL with bf16 compute, checkpointing and a sharded checkpoint round trip, "
          f"offload={offload} (shards on {where.pop()})")


def megatron_nccl(path: str, root: Path) -> None:
    """In a process of its own (a process group per process)."""
    from lingshu_rl.config import ModelConfig, TrainConfig
    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.train.megatron.engine import MegatronEngine

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = TrainConfig(engine="megatron", lr=1e-4, device="cuda", gradient_checkpointing=True)
    engine = MegatronEngine(path, ModelConfig(dtype="bfloat16"), cfg, total_steps=4, master_port=port)
    assert torch.distributed.get_backend() == "nccl"
    first = engine.update(batch(), GRPOLoss())
    engine.save(root / "ckpt-megatron")
    engine.load_training_state(root / "ckpt-megatron")
    second = engine.update(batch(), GRPOLoss())
    assert math.isfinite(first["actor/loss"]) and math.isfinite(second["actor/grad_norm"]), (first, second)
    mains = [m for m in engine.optim.main if m is not None]
    assert all(m.dtype == torch.float32 and m.is_cuda for m in mains)
    print("PASS megatron over NCCL with bf16 compute on float32 main weights and an optimiser-state round trip")


def launcher(root: Path) -> None:
    sets = ["train.device=cuda", "model.dtype=bfloat16", "rollout.engine=transformers", "rollout.weight_sync=ipc",
            "grpo.steps=3",
            "sft.stages.0.steps=20", "eval.limit=20", "cluster.actor_gpus=1", "logging.wandb.mode=disabled"]
    args = [sys.executable, "-m", "lingshu_rl.launch", "--reward", "mcq_exact", "--output-dir", str(root / "run")]
    for item in sets:
        args += ["--set", item]
    subprocess.run(args, check=True, env={**os.environ, "LINGSHU_CACHE": str(root / "cache")})
    print("PASS the launcher end to end on the GPU, weights to the rollout through CUDA IPC")


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
    from lingshu_rl.models.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = str(build_tiny_model(cache_dir=root / "cache"))
        master_weights(path)
        for offload in (False, True):
            child = multiprocessing.get_context("spawn").Process(target=fsdp_nccl, args=(path, root, offload))
            child.start()
            child.join()
            assert child.exitcode == 0, f"FSDP2 over NCCL (offload={offload}) failed: see above"
        if importlib.util.find_spec("megatron") is not None:
            child = multiprocessing.get_context("spawn").Process(target=megatron_nccl, args=(path, root))
            child.start()
            child.join()
            assert child.exitcode == 0, "megatron over NCCL failed: see above"
        else:
            print("SKIP megatron over NCCL: megatron-core is not installed (pip install '.[megatron]')")
        launcher(root)


if __name__ == "__main__":
    main()
