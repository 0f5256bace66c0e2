"""Weights from the trainer to the rollout workers over a process group of their own, one bucket at a time.

The group is the trainer's rank 0 (the source, rank 0 here) and every rollout worker (ranks 1..k), joined
through a TCP store that rank 0 hosts: gloo on CPU, NCCL on GPU. It is separate from the trainer's own process
group (FSDP's, megatron's) and from vLLM's, so none of them has to know about the others.

Every sync sends the same tensors in the same order: the *manifest* (names, shapes, dtypes) fixed when the group
is made. Both sides plan the same buckets from it, and each bucket travels as one flat byte buffer broadcast from
rank 0, with no metadata per sync. The receiver yields a bucket's tensors one by one straight into the engine's
loader, so on either side one bucket (and the tensors being gathered or loaded) is in flight: never a whole
model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ALIGN = 64  # bytes


class SyncError(RuntimeError):
    """The tensors a trainer sends do not match the manifest the group was made with (the message names one)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Rendezvous:
    """Where the sync group meets: rank 0's store (its node's address and a free port there)."""

    host: str
    port: int
    world_size: int
    timeout_s: float = 600.0


def plan_buckets(manifest: list[TensorSpec], bucket_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors in buckets of at most ``bucket_bytes`` (a larger tensor travels alone)."""
    buckets: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in manifest:
        if buckets[-1] and size + spec.nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(spec)
        size += spec.nbytes
    return [b for b in buckets if b]


def _offsets(bucket: list[TensorSpec]) -> tuple[list[int], int]:
    """Where each tensor starts in its bucket's buffer (aligned, so that every byte view can be typed), and the
    buffer's size."""
    offsets, end = [], 0
    for spec in bucket:
        start = -(-end // ALIGN) * ALIGN
        offsets.append(start)
        end = start + spec.nbytes
    return offsets, end


class WeightChannel:
    """One member's end of the sync group: rank 0 :meth:`send`\\ s, every other rank :meth:`receive`\\ s."""

    def __init__(self, rendezvous: Rendezvous, rank: int, manifest: list[TensorSpec], bucket_bytes: int,
                 device: torch.device):
        timeout = timedelta(seconds=rendezvous.timeout_s)
        self.rank, self.device = rank, device
        self.store = dist.TCPStore(rendezvous.host, rendezvous.port, rendezvous.world_size, is_master=rank == 0,
                                   timeout=timeout)
        prefixed = dist.PrefixStore("lingshu-weights", self.store)
        self.group: Any  # a c10d backend: ProcessGroupGloo or ProcessGroupNCCL (their stubs omit the collectives)
        if device.type == "cuda":  # GPU only, not run here: torch's NCCL group on its own store
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(prefixed, rank, rendezvous.world_size, options)
        else:
            self.group = dist.ProcessGroupGloo(prefixed, rank, rendezvous.world_size, timeout)
        self.buckets = plan_buckets(manifest, bucket_bytes)

    def close(self) -> None:
        """Release the group, then its store, now (left to the garbage collector, a reference cycle could destroy
        them while the interpreter exits, in any order)."""
        self.group = None
        self.store = None  # type: ignore[assignment]

    def _broadcast(self, buffer: Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([buffer], options).wait()

    def send(self, tensors: Iterable[tuple[str, Tensor]]) -> int:
        """Broadcast ``tensors`` (in manifest order) bucket by bucket; returns the bytes sent."""
        stream = iter(tensors)
        sent = 0
        for bucket in self.buckets:
            offsets, size = _offsets(bucket)
            buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
            for spec, offset in zip(bucket, offsets):
                name, tensor = next(stream, (None, None))
                if name != spec.name or tensor is None or tuple(tensor.shape) != spec.shape:
                    got = "nothing" if tensor is None else f"{name} {tuple(tensor.shape)}"
                    raise SyncError(f"weight sync: expected {spec.name} {spec.shape}, the trainer gave {got}")
                flat = tensor.detach().to(self.device, spec.dtype).contiguous().view(-1).view(torch.uint8)
                buffer[offset:offset + spec.nbytes].copy_(flat)
            self._broadcast(buffer)
            sent += buffer.numel()
        extra = next(stream, None)
        if extra is not None:
            raise SyncError(f"weight sync: the trainer gave {extra[0]}, which the manifest does not have")
        return sent

    def receive(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, tensor)`` in manifest order, each bucket received when the consumer reaches it."""
        for bucket in self.buckets:
            offsets, size = _offsets(bucket)
            buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
            self._broadcast(buffer)
            for spec, offset in zip(bucket, offsets):
                # a copy, not a view: a loader may keep some tensors until their layer is complete (vLLM's
                # layerwise reload does), and a view would keep this whole bucket alive beside the next one
                yield spec.name, buffer[offset:offset + spec.nbytes].view(spec.dtype).view(spec.shape).clone()
            del buffer
