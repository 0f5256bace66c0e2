"""Weights from the trainer to the rollout workers over a process group of their own, one bucket at a time.

The group is the trainer's rank 0 (the source, rank 0 here) and every rollout worker (ranks 1..k), joined
through a TCP store that rank 0 hosts. It is separate from the trainer's own process group (FSDP's, megatron's)
and from vLLM's, so none of them has to know about the others.

Every sync sends the same tensors in the same order: the *manifest* (names, shapes, dtypes) fixed when the group
is made. Both sides plan the same buckets from it, and each bucket travels as one flat byte buffer, with no
metadata per sync. The receiver yields a bucket's tensors one by one straight into the engine's loader, so on
either side one bucket (and the tensors being gathered or loaded) is in flight: never a whole model.

How a bucket's bytes travel is the group's *transport* (:attr:`Rendezvous.transport`):

- ``collective``: broadcast from rank 0 through the group itself, gloo on CPU, NCCL on GPU.
- ``ipc``, for rollout workers on rank 0's machine (on GPU: on its device, which an NCCL group cannot share): rank
  0 allocates one staging buffer, the size of the largest bucket, once, and every member maps it: POSIX shared
  memory on CPU (:class:`multiprocessing.shared_memory.SharedMemory`, viewed with :func:`torch.frombuffer`), a
  CUDA IPC handle on GPU (:func:`torch.multiprocessing.reductions.reduce_tensor`, opened by calling the rebuild
  function it returns, as verl's and vLLM's RLHF colocate examples do). The group is then gloo everywhere and
  carries only the handle, once, and two barriers per bucket: *filled* (rank 0 has packed it) and *taken* (every
  receiver has copied it out; rank 0 may refill it). The shared memory's name is unlinked as soon as every member
  has mapped it, so nothing is left in ``/dev/shm`` however a process ends. The CUDA branch is written against
  torch's documented ``reduce_tensor``/CUDA IPC but has NOT run: the machine this was built on has no GPU.
"""

from __future__ import annotations

import math
import os
import pickle
import secrets
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

ALIGN = 64  # bytes
SHM_PREFIX = "lingshu-weights-"  # the ipc transport's shared memory on CPU: /dev/shm/lingshu-weights-<pid>-<random>

Transport = Literal["collective", "ipc"]


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
    """Where the sync group meets: rank 0's store (its node's address and a free port there), and how the buckets
    travel (``transport``, see the module's docstring)."""

    host: str
    port: int
    world_size: int
    timeout_s: float = 600.0
    transport: Transport = "collective"


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


def _broadcast(group: Any, buffer: Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([buffer], options).wait()


def _barrier(group: Any) -> None:
    group.barrier(dist.BarrierOptions()).wait()


class _Broadcast:
    """``collective``: each bucket is broadcast from rank 0 into a fresh buffer on every member."""

    def __init__(self, group: Any, device: torch.device):
        self.group, self.device = group, device

    def staging(self, size: int) -> Tensor:
        """Rank 0: where to pack the next bucket."""
        return torch.empty(size, dtype=torch.uint8, device=self.device)

    def publish(self, buffer: Tensor) -> None:
        """Rank 0: the packed bucket to every receiver; returns when ``buffer`` may be reused."""
        _broadcast(self.group, buffer)

    def take(self, size: int) -> Tensor:
        """A receiver: the next bucket's bytes, valid until :meth:`release`."""
        buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        _broadcast(self.group, buffer)
        return buffer

    def release(self) -> None:
        """A receiver: done with the bucket :meth:`take` gave."""

    def close(self) -> None:
        self.group = None


class _Shared:
    """``ipc``: one staging buffer on rank 0's device, mapped by every member once; per bucket, rank 0 packs it
    and every receiver copies out of it, between two barriers on the (gloo) group."""

    def __init__(self, group: Any, rank: int, device: torch.device, size: int):
        self.group, self.device, self.owner = group, device, rank == 0
        self.shm: SharedMemory | None = None
        self.buffer: Tensor | None = None
        self.linked = False  # rank 0's shared memory still has its name in /dev/shm
        try:
            if self.owner:
                handle = self._share(max(size, 1))
                self.linked = self.shm is not None
                _broadcast_bytes(group, pickle.dumps(handle))
            else:
                self._open(pickle.loads(_broadcast_bytes(group, None)))
            _barrier(group)  # every member has mapped the buffer: its name may go
            if self.linked:
                self._unlink()
        except BaseException:
            self.close()
            raise

    def _share(self, size: int) -> tuple[Any, ...]:
        """Rank 0: allocate the staging buffer; what a member needs to map it."""
        if self.device.type == "cuda":  # not run here (no GPU)
            from torch.multiprocessing.reductions import reduce_tensor

            self.buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
            rebuild, args = reduce_tensor(self.buffer)
            return ("cuda", rebuild, args, _device_uuid(self.device))
        self.shm = SharedMemory(f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}", create=True, size=size)
        self.buffer = torch.frombuffer(self.shm.buf, dtype=torch.uint8, count=size)
        return ("shm", self.shm.name, size)

    def _open(self, handle: tuple[Any, ...]) -> None:
        """A receiver: map rank 0's staging buffer."""
        if handle[0] == "cuda":  # not run here (no GPU)
            _, rebuild, args, uuid = handle
            mine = _device_uuid(self.device) if self.device.type == "cuda" else "not a GPU"
            if mine != uuid:
                raise ValueError(f"rollout.weight_sync=ipc: the trainer's rank 0 shares a buffer on the GPU {uuid}, "
                                 f"this rollout worker runs on {self.device} ({mine}): ipc needs the same device "
                                 "(use rollout.weight_sync=collective)")
            args = list(args)
            args[6] = _index(self.device)  # storage_device: this process may number the same GPU differently
            self.buffer = rebuild(*args)
            return
        _, name, size = handle
        if self.device.type != "cpu":
            raise ValueError(f"rollout.weight_sync=ipc: the trainer's rank 0 shares a buffer in CPU memory, this "
                             f"rollout worker runs on {self.device} (use rollout.weight_sync=collective)")
        self.shm = _attach(name)
        self.buffer = torch.frombuffer(self.shm.buf, dtype=torch.uint8, count=size)

    def staging(self, size: int) -> Tensor:
        assert self.buffer is not None, "the channel is closed"
        return self.buffer[:size]

    def publish(self, buffer: Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the packing copies are done
        _barrier(self.group)  # filled
        _barrier(self.group)  # taken: every receiver has copied the bucket out

    def take(self, size: int) -> Tensor:
        assert self.buffer is not None, "the channel is closed"
        _barrier(self.group)  # filled
        return self.buffer[:size]

    def release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the copies out of the buffer are done
        _barrier(self.group)  # taken

    def _unlink(self) -> None:
        """Rank 0: remove the shared memory's name (the mappings stay valid; the memory goes with the last one)."""
        assert self.shm is not None
        self.linked = False
        # register the name again first: a receiver sharing this process's resource tracker (a process started by
        # multiprocessing) has unregistered it, and unlink() unregisters it once more
        resource_tracker.register(f"/{self.shm.name}", "shared_memory")
        self.shm.unlink()

    def close(self) -> None:
        """Drop this member's mapping; rank 0 unlinks the shared memory if a failed join left its name."""
        self.buffer = None  # the views first: the mapping cannot close under them
        if self.shm is not None:
            if self.owner and self.linked:
                self._unlink()
            self.shm.close()
            self.shm = None
        self.group = None


def _broadcast_bytes(group: Any, payload: bytes | None) -> bytes:
    """Rank 0's ``payload`` on every member: its length, then its bytes."""
    length = torch.tensor([0 if payload is None else len(payload)], dtype=torch.int64)
    _broadcast(group, length)
    data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload is not None
            else torch.empty(int(length.item()), dtype=torch.uint8))
    _broadcast(group, data)
    return data.numpy().tobytes()


def _attach(name: str) -> SharedMemory:
    """Map the shared memory ``name`` without making this process's resource tracker its owner: before Python 3.13
    every attach registers it, and the tracker would unlink it when this process exits (CPython gh-82300)."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name, track=False)
    shm = SharedMemory(name)
    resource_tracker.unregister(f"/{shm.name}", "shared_memory")
    return shm


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(_index(device)).uuid)


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
        if device.type == "cuda" and rendezvous.transport == "collective":  # GPU only, not run here
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(prefixed, rank, rendezvous.world_size, options)
        else:  # ipc: the group carries only the handle and barriers, on CPU
            self.group = dist.ProcessGroupGloo(prefixed, rank, rendezvous.world_size, timeout)
        self.buckets = plan_buckets(manifest, bucket_bytes)
        self.transport: _Broadcast | _Shared
        if rendezvous.transport == "ipc":
            largest = max((_offsets(b)[1] for b in self.buckets), default=0)
            self.transport = _Shared(self.group, rank, device, largest)
        else:
            self.transport = _Broadcast(self.group, device)

    def close(self) -> None:
        """Release the transport (the ipc buffer's mapping), the group, then its store, now (left to the garbage
        collector, a reference cycle could destroy them while the interpreter exits, in any order)."""
        self.transport.close()
        self.group = None
        self.store = None  # type: ignore[assignment]

    def send(self, tensors: Iterable[tuple[str, Tensor]]) -> int:
        """Send ``tensors`` (in manifest order) bucket by bucket; returns the bytes sent."""
        stream = iter(tensors)
        sent = 0
        for bucket in self.buckets:
            offsets, size = _offsets(bucket)
            buffer = self.transport.staging(size)
            for spec, offset in zip(bucket, offsets):
                name, tensor = next(stream, (None, None))
                if name != spec.name or tensor is None or tuple(tensor.shape) != spec.shape:
                    got = "nothing" if tensor is None else f"{name} {tuple(tensor.shape)}"
                    raise SyncError(f"weight sync: expected {spec.name} {spec.shape}, the trainer gave {got}")
                flat = tensor.detach().to(self.device, spec.dtype).contiguous().view(-1).view(torch.uint8)
                buffer[offset:offset + spec.nbytes].copy_(flat)
            self.transport.publish(buffer)
            sent += buffer.numel()
        extra = next(stream, None)
        if extra is not None:
            raise SyncError(f"weight sync: the trainer gave {extra[0]}, which the manifest does not have")
        return sent

    def receive(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, tensor)`` in manifest order, each bucket received when the consumer reaches it."""
        for bucket in self.buckets:
            offsets, size = _offsets(bucket)
            buffer = self.transport.take(size)
            for spec, offset in zip(bucket, offsets):
                # a copy, not a view: a loader may keep some tensors until their layer is complete (vLLM's
                # layerwise reload does), and a view would keep this whole bucket alive beside the next one (ipc:
                # would see the next bucket's bytes)
                yield spec.name, buffer[offset:offset + spec.nbytes].view(spec.dtype).view(spec.shape).clone()
            del buffer
            self.transport.release()
