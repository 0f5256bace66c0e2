"""A policy role as a group of ranks: one Ray actor per rank, joined by ``torch.distributed``.

    group = PolicyGroup.start(options, model_path, model_cfg, train_cfg, total_steps, trainable, seed, threads)
    ray.get(group.update.remote(batch, loss))   # each data-parallel rank trains on its share; rank 0's metrics

Ranks are ``data_parallel_size x tensor_parallel_size`` (FSDP2: DP ranks; megatron: DP replicas of a TP group).
:class:`PolicyGroup` has the methods of :class:`EngineActor` (``logprobs``, ``update``, ``weights``,
``send_weights``, ``save``, ...), each with ``.remote(...)`` returning one ``ObjectRef``, so the controller and the
SFT stages drive a group exactly as they drive a single worker. The group deals each update's batch to the
data-parallel ranks by token count (:mod:`lingshu_rl.train.split`) and puts log-probs back in row order. Rank 0
picks the rendezvous address (its node IP and a free port); the engines initialise the process group.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import torch
from torch import Tensor

from lingshu_rl.config import ModelConfig, TrainConfig
from lingshu_rl.models.transfer import Rendezvous, TensorSpec
from lingshu_rl.train.batch import TokenBatch, with_vision
from lingshu_rl.train.protocol import Loss
from lingshu_rl.train.split import MiniBatch, balanced_shards, blank_row, plan_updates


def group_sizes(train_cfg: TrainConfig) -> tuple[int, int]:
    """``(data_parallel_size, tensor_parallel_size)`` of a policy role; ``(1, 1)`` is a plain worker."""
    tp = train_cfg.tensor_parallel_size if train_cfg.engine == "megatron" else 1
    dp = train_cfg.data_parallel_size if train_cfg.strategy == "fsdp2" or train_cfg.engine == "megatron" else 1
    return dp, tp


def is_group(train_cfg: TrainConfig) -> bool:
    """Whether a policy role runs as a :class:`PolicyGroup` (FSDP2 at any size shards through its group)."""
    return train_cfg.strategy == "fsdp2" or group_sizes(train_cfg) != (1, 1)


def fetch_images(batch: TokenBatch) -> TokenBatch:
    """``batch`` with the images its rows refer to (``vision_refs``) fetched from Ray's object store and attached:
    this rank fetches only its own rows' images."""
    if batch.vision_refs is None:
        return batch
    refs = batch.vision_refs
    fetched = iter(ray.get([r for r in refs if r is not None]))
    return with_vision(batch.with_(vision_refs=None), [None if r is None else next(fetched) for r in refs])


def _fetch_work(work: TokenBatch | list[MiniBatch]) -> TokenBatch | list[MiniBatch]:
    if isinstance(work, TokenBatch):
        return fetch_images(work)
    return [replace(mini, batch=fetch_images(mini.batch)) for mini in work]


class EngineActor:
    """What a policy actor answers, forwarded to its training engine (``self.engine``): the methods the controller
    and the SFT stages call on a policy worker, a rank, or (through :class:`PolicyGroup`) a group."""

    engine: Any

    def logprobs(self, batch: TokenBatch, temperature: float, micro_batches: int = 0) -> Tensor:
        return self.engine.logprobs(fetch_images(batch), temperature, micro_batches)

    def update(self, work: TokenBatch | list[MiniBatch], loss: Loss) -> dict[str, float]:
        return self.engine.update(_fetch_work(work), loss)

    def weights(self) -> dict[str, Tensor]:
        return self.engine.weights()

    def weight_manifest(self) -> list[TensorSpec]:
        return self.engine.weight_manifest()

    def join_weight_sync(self, rendezvous: Rendezvous, bucket_bytes: int) -> None:
        self.engine.join_weight_sync(rendezvous, bucket_bytes)

    def send_weights(self) -> int:
        return self.engine.send_weights()

    def probe(self, batch: TokenBatch) -> dict[str, Tensor]:
        return self.engine.probe(batch)

    def save(self, directory: str) -> None:
        self.engine.save(Path(directory))

    def load_training_state(self, directory: str) -> None:
        self.engine.load_training_state(Path(directory))

    def pid(self) -> int:
        return os.getpid()

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port on it (a rendezvous: rank 0's process group, the weight-sync group)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            return ray.util.get_node_ip_address(), sock.getsockname()[1]


class PolicyRank(EngineActor):
    """The Ray actor of one rank: builds its engine once :meth:`start` gives it the rendezvous address."""

    def __init__(self, rank: int, world_size: int, model_path: str, model_cfg: ModelConfig, train_cfg: TrainConfig,
                 total_steps: int, trainable: bool, seed: int, threads: int = 0, lr: float | None = None):
        if threads > 0:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.rank, self.world_size = rank, world_size
        self.args = (model_path, model_cfg, train_cfg, total_steps, trainable, lr)
        self.seed = seed
        self.engine: Any = None

    def start(self, master_addr: str, master_port: int) -> None:
        model_path, model_cfg, train_cfg, total_steps, trainable, lr = self.args
        if train_cfg.engine == "megatron":
            from lingshu_rl.train.megatron.engine import MegatronEngine

            self.engine = MegatronEngine(*self.args, rank=self.rank, master_addr=master_addr,
                                         master_port=master_port, seed=self.seed)
        else:
            from lingshu_rl.train.fsdp import DistInfo
            from lingshu_rl.train.torch_engine import TorchEngine

            self.engine = TorchEngine(model_path, model_cfg, train_cfg, total_steps, trainable, lr,
                                      DistInfo(self.rank, self.world_size, master_addr, master_port))


@ray.remote(num_cpus=0)
def _rank0_result(*results: Any) -> Any:
    """Ready when every rank has finished (an error on any rank propagates); the value is rank 0's."""
    return results[0]


@ray.remote(num_cpus=0)
def _assemble(shards: list[list[int]], shape: tuple[int, int], tp: int, *results: Tensor) -> Tensor:
    """Per-rank log-probs back into one ``[N, T]`` tensor in the batch's row order (one result per data-parallel
    rank: the first of its tensor-parallel group; waiting for all of them lets any rank's error through)."""
    out = torch.zeros(shape, dtype=torch.float32)
    for rows, part in zip(shards, results[::tp]):
        if rows:
            out[rows, :part.shape[1]] = part
    return out


class _OnAllRanks:
    """``.remote(*args)``: the same call on every rank (arguments put in the object store once)."""

    def __init__(self, methods: list[Any]):
        self.methods = methods

    def remote(self, *args: Any) -> ray.ObjectRef:
        refs = [a if isinstance(a, ray.ObjectRef) else ray.put(a) for a in args]
        return _rank0_result.remote(*(m.remote(*refs) for m in self.methods))


class _Update:
    """``.remote(batch, loss)``: plan the update, send each rank its data-parallel share."""

    def __init__(self, group: PolicyGroup):
        self.group = group

    def remote(self, batch: TokenBatch, loss: Loss) -> ray.ObjectRef:
        g = self.group
        plan = plan_updates(batch, g.train_cfg.updates_per_step, g.dp, g.train_cfg.micro_batch_size)
        shares, loss_ref = [ray.put(share) for share in plan], ray.put(loss)
        return _rank0_result.remote(*(r.update.remote(shares[i // g.tp], loss_ref) for i, r in enumerate(g.ranks)))


class _Logprobs:
    """``.remote(batch, temperature)``: each data-parallel rank scores its share; rows come back in order."""

    def __init__(self, group: PolicyGroup):
        self.group = group

    def remote(self, batch: TokenBatch, temperature: float) -> ray.ObjectRef:
        g = self.group
        shards = balanced_shards(batch.attention_mask.sum(dim=1).tolist(), g.dp)
        # every rank runs as many forward passes as the busiest (FSDP gathers parameters in each)
        micro = g.train_cfg.micro_batch_size
        micro_batches = max(-(-len(rows) // micro) for rows in shards)
        parts = [ray.put(batch.select(torch.tensor(rows, dtype=torch.long)) if rows else blank_row(batch))
                 for rows in shards]
        results = [r.logprobs.remote(parts[i // g.tp], temperature, micro_batches) for i, r in enumerate(g.ranks)]
        rows, length = batch.input_ids.shape
        return _assemble.remote(shards, (rows, length), g.tp, *results)


class PolicyGroup:
    """The driver's handle on the rank actors, with :class:`EngineActor`'s methods."""

    def __init__(self, ranks: list[Any], train_cfg: TrainConfig):
        self.ranks, self.train_cfg = ranks, train_cfg
        self.dp, self.tp = group_sizes(train_cfg)
        self.logprobs = _Logprobs(self)
        self.update = _Update(self)
        self.weights = _OnAllRanks([r.weights for r in ranks])
        self.weight_manifest = ranks[0].weight_manifest
        self.address = ranks[0].address
        self.join_weight_sync = _OnAllRanks([r.join_weight_sync for r in ranks])
        self.send_weights = _OnAllRanks([r.send_weights for r in ranks])
        self.probe = _OnAllRanks([r.probe for r in ranks])  # the same forward on every rank
        self.save = _OnAllRanks([r.save for r in ranks])
        self.load_training_state = _OnAllRanks([r.load_training_state for r in ranks])
        self.pid = _OnAllRanks([r.pid for r in ranks])

    @classmethod
    def start(cls, options: Callable[[int], dict[str, Any]], model_path: str, model_cfg: ModelConfig,
              train_cfg: TrainConfig, total_steps: int, trainable: bool, seed: int, threads: int = 0,
              lr: float | None = None) -> PolicyGroup:
        """Start the rank actors (``options(rank)`` gives each one's Ray options) and their engines."""
        dp, tp = group_sizes(train_cfg)
        actor = ray.remote(PolicyRank)
        # Any: ray types a handle's methods as the plain methods, without their ``.remote``
        ranks: list[Any] = [actor.options(**options(r)).remote(r, dp * tp, model_path, model_cfg, train_cfg,
                                                               total_steps, trainable, seed, threads, lr)
                            for r in range(dp * tp)]
        group = cls(ranks, train_cfg)
        try:
            master_addr, master_port = ray.get(ranks[0].address.remote())
            _get_all([r.start.remote(master_addr, master_port) for r in ranks])
        except BaseException:
            group.kill()
            raise
        return group

    def terminate(self) -> list[ray.ObjectRef]:
        """Graceful exit of every rank (as ``handle.__ray_terminate__.remote()`` for one actor)."""
        return [r.__ray_terminate__.remote() for r in self.ranks]

    def kill(self) -> None:
        for r in self.ranks:
            ray.kill(r, no_restart=True)


def _get_all(refs: list[ray.ObjectRef]) -> None:
    """Wait for all, raising the first error as soon as it happens (the other ranks would wait for the failed
    one in a collective until the process-group timeout)."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done[0])


def terminate_policy(handle: Any) -> list[ray.ObjectRef]:
    """Graceful exit (queued calls finish first) of a policy worker actor or of every rank of a group."""
    return handle.terminate() if isinstance(handle, PolicyGroup) else [handle.__ray_terminate__.remote()]


def kill_policy(handle: Any) -> None:
    """``ray.kill`` for a policy worker actor or a :class:`PolicyGroup`."""
    if isinstance(handle, PolicyGroup):
        handle.kill()
    else:
        ray.kill(handle, no_restart=True)
