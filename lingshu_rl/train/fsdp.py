"""FSDP2 for the torch engine: the process group, sharding, full weights for export, sharded checkpoints.

Each data-parallel rank is one process on one device (gloo on CPU, NCCL on GPU). Parameters stay float32 (the
master copy the optimizer updates) and are sharded across ranks; each layer's are gathered in the compute
dtype for its forward and backward (``MixedPrecisionPolicy``), and gradients are reduced in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard


@dataclass(frozen=True)
class DistInfo:
    """Where a rank sits in its group and how to reach the group's rendezvous."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int


def init_process_group(info: DistInfo, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{info.master_addr}:{info.master_port}", rank=info.rank,
                            world_size=info.world_size, timeout=timedelta(minutes=30))
    if device.type == "cuda":
        torch.cuda.set_device(device)


def shard_model(module: torch.nn.Module, blocks: list[torch.nn.Module], device: torch.device,
                compute_dtype: torch.dtype, offload: bool) -> None:
    """``fully_shard`` each block (decoder layer, vision block), then the root. FSDP averages gradients over the
    ranks; the engine scales its loss by the world size to get their sum (the loss is already normalised over all
    ranks). A divide factor of 1 would say the same but needs PREMUL_SUM, which gloo lacks."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    placement = CPUOffloadPolicy() if offload else OffloadPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=placement)
    fully_shard(module, mesh=mesh, mp_policy=policy, offload_policy=placement)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, gathered on CPU: on rank 0 only (empty on the others) when sharded."""
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def save_train_state(directory: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model (float32 master weights) and optimizer state, each rank writing its own shard
    (``torch.distributed.checkpoint``); loads back at any data-parallel size."""
    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))


def load_train_state(directory: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))  # loads in place
    set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
