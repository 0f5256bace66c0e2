"""FSDP2 for the torch engine: the process group, sharding, full weights for export, sharded checkpoints.

Each data-parallel rank is one process on one device (gloo on CPU, NCCL on GPU). Parameters stay float32 (the
master copy the optimizer updates) and are sharded across ranks; each layer's are gathered in the compute
dtype for its forward and backward (``MixedPrecisionPolicy``), and gradients are reduced in float32.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor


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


def device_mesh(device: torch.device, shard_size: int = 0) -> DeviceMesh:
    """The data-parallel mesh (a collective: all ranks call it together). One dimension over every rank (FSDP);
    with ``0 < shard_size <`` the world size, ``(replicate, shard)`` (HSDP): each run of ``shard_size`` consecutive
    ranks shards one copy of the model, and ``fully_shard`` all-reduces gradients across the copies."""
    world = dist.get_world_size()
    if not shard_size or shard_size == world:
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def load_turn(hosts: list[str], rank: int) -> tuple[int, int]:
    """``(turn, turns)``: the ranks of each host load the full model one after another, so that a host holds one
    full copy at a time; hosts go in parallel. ``hosts``: every rank's host name, in rank order."""
    return hosts[:rank].count(hosts[rank]), max(hosts.count(host) for host in hosts)


def host_names() -> list[str]:
    """Every rank's host name, in rank order (a collective). Ray nodes on one machine share its memory: they
    count as one host."""
    hosts: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts


def shard_model(module: torch.nn.Module, blocks: list[torch.nn.Module], mesh: DeviceMesh,
                compute_dtype: torch.dtype, offload: bool) -> None:
    """``fully_shard`` each block (decoder layer, vision block), then the root, over ``mesh`` (FSDP or HSDP). FSDP
    averages gradients over all the mesh's ranks; the engine scales its loss by the world size to get their sum
    (the loss is already normalised over all ranks). A divide factor of 1 would say the same but needs PREMUL_SUM,
    which gloo lacks.

    ``offload``: shards, gradients and optimizer state stay in host memory, each layer copied to the device for its
    forward and backward. On a CPU rank nothing moves, but FSDP2 runs the same offload code (what the tests check);
    pinned host memory needs an accelerator."""
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    placement = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if offload else OffloadPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=placement)
    fully_shard(module, mesh=mesh, mp_policy=policy, offload_policy=placement)


def state_entries(module: torch.nn.Module, prefix: str = "", tied_once: bool = True
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, value)`` for each entry of ``module``'s state dict under ``prefix``, the prefix removed, as this rank
    holds it (a sharded value is a ``DTensor`` whose ``shape`` is the full one). ``tied_once``: a tied weight comes
    once, under its first name (as a checkpoint stores it), else under each name."""
    seen: set[int] = set()
    for name, value in module.state_dict(keep_vars=True).items():
        if not name.startswith(prefix) or (tied_once and id(value) in seen):
            continue
        seen.add(id(value))
        yield name.removeprefix(prefix), value


def gathered_tensors(module: torch.nn.Module, prefix: str = "", tied_once: bool = True, to_cpu: bool = True
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`state_entries` as full tensors (on the CPU unless ``to_cpu=False``), gathered one at a time: every
    rank takes part in each gather; unsharded modules need none."""
    for name, value in state_entries(module, prefix, tied_once):
        full = value.full_tensor() if isinstance(value, DTensor) else value
        yield name, full.detach().cpu() if to_cpu else full.detach()


def write_safetensors(directory: Path, tensors: Iterable[tuple[str, torch.Tensor]], shard_bytes: int,
                      write: bool) -> None:
    """Stream ``tensors`` into Hugging Face safetensors shards of about ``shard_bytes`` (``model.safetensors``
    when one shard holds all, else ``model-0000i-of-0000n.safetensors`` and their index): at most one shard is in
    memory. ``write=False`` consumes the stream (its gathers) without writing (the ranks other than 0)."""
    shard: dict[str, torch.Tensor] = {}
    files: list[dict[str, torch.Tensor]] = []
    names: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard and write:
            names.append(f"part-{len(names):05d}.safetensors")
            save_file(shard, str(directory / names[-1]), metadata={"format": "pt"})
            files.append({k: v[:0] for k, v in shard.items()})  # names and dtypes only, for the index
        shard, size = {}, 0

    for name, tensor in tensors:
        if size and size + tensor.nbytes > shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        size += tensor.nbytes
    flush()
    if not write:
        return
    if len(names) == 1:
        (directory / names[0]).rename(directory / "model.safetensors")
        return
    final = [f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i in range(len(names))]
    weight_map = {}
    for old, new, keys in zip(names, final, files):
        (directory / old).rename(directory / new)
        weight_map.update(dict.fromkeys(keys, new))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_train_state(directory: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model (float32 master weights) and optimizer state, each rank writing its own shard
    (``torch.distributed.checkpoint``); loads back at any data-parallel size."""
    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))


def load_train_state(directory: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))  # loads in place
    set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
