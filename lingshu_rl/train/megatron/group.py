"""The megatron engine on Ray: one actor per tensor-parallel rank, and the driver's handle on them.

    group = MegatronGroup.start(tp, options, model_path, model_cfg, train_cfg, total_steps, trainable, seed, threads)
    ray.get(group.update.remote(batch, loss))   # every rank runs it; the result is rank 0's

:class:`MegatronGroup` has the methods of ``grpo.workers.PolicyWorker`` (``logprobs``, ``update``, ``weights``,
``save``, ``load_training_state``, ``pid``), each with ``.remote(...)`` returning one ``ObjectRef``, so the
controller and the SFT stages drive a group exactly as they drive a single worker. Rank 0 picks the rendezvous
address (its node IP and a free port); the engine then initialises the process groups itself.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
from torch import Tensor

from lingshu_rl.config import ModelConfig, TrainConfig
from lingshu_rl.train.batch import TokenBatch
from lingshu_rl.train.protocol import Loss


class MegatronRank:
    """The Ray actor of one rank: builds its :class:`~lingshu_rl.train.megatron.engine.MegatronEngine` once
    :meth:`start` gives it the rendezvous address."""

    def __init__(self, rank: int, model_path: str, model_cfg: ModelConfig, train_cfg: TrainConfig,
                 total_steps: int, trainable: bool, seed: int, threads: int = 0, lr: float | None = None):
        if threads > 0:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.rank = rank
        self.args = (model_path, model_cfg, train_cfg, total_steps, trainable, lr)
        self.seed = seed
        self.engine: Any = None

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port for the group's rendezvous (asked of rank 0)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            return ray.util.get_node_ip_address(), sock.getsockname()[1]

    def start(self, master_addr: str, master_port: int) -> None:
        from lingshu_rl.train.megatron.engine import MegatronEngine

        self.engine = MegatronEngine(*self.args, rank=self.rank, master_addr=master_addr, master_port=master_port,
                                     seed=self.seed)

    def logprobs(self, batch: TokenBatch, temperature: float) -> Tensor:
        return self.engine.logprobs(batch, temperature)

    def update(self, batch: TokenBatch, loss: Loss) -> dict[str, float]:
        return self.engine.update(batch, loss)

    def weights(self) -> dict[str, Tensor]:
        return self.engine.weights()

    def save(self, directory: str) -> None:
        self.engine.save(Path(directory))

    def load_training_state(self, directory: str) -> None:
        self.engine.load_training_state(Path(directory))

    def pid(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0)
def _rank0_result(*results: Any) -> Any:
    """Ready when every rank has finished (an error on any rank propagates); the value is rank 0's."""
    return results[0]


class _OnAllRanks:
    """``.remote(*args)``: the same call on every rank (arguments put in the object store once)."""

    def __init__(self, methods: list[Any]):
        self.methods = methods

    def remote(self, *args: Any) -> ray.ObjectRef:
        refs = [a if isinstance(a, ray.ObjectRef) else ray.put(a) for a in args]
        return _rank0_result.remote(*(m.remote(*refs) for m in self.methods))


class MegatronGroup:
    """The driver's handle on the rank actors, with ``PolicyWorker``'s methods."""

    def __init__(self, ranks: list[Any]):
        self.ranks = ranks
        self.logprobs = _OnAllRanks([r.logprobs for r in ranks])
        self.update = _OnAllRanks([r.update for r in ranks])
        self.weights = _OnAllRanks([r.weights for r in ranks])
        self.save = _OnAllRanks([r.save for r in ranks])
        self.load_training_state = _OnAllRanks([r.load_training_state for r in ranks])
        self.pid = _OnAllRanks([r.pid for r in ranks])

    @classmethod
    def start(cls, size: int, options: Callable[[int], dict[str, Any]], model_path: str, model_cfg: ModelConfig,
              train_cfg: TrainConfig, total_steps: int, trainable: bool, seed: int, threads: int = 0,
              lr: float | None = None) -> MegatronGroup:
        """Start ``size`` rank actors (``options(rank)`` gives each one's Ray options) and their engines."""
        actor = ray.remote(MegatronRank)
        # Any: ray types a handle's methods as the plain methods, without their ``.remote``
        ranks: list[Any] = [actor.options(**options(r)).remote(r, model_path, model_cfg, train_cfg, total_steps,
                                                               trainable, seed, threads, lr) for r in range(size)]
        group = cls(ranks)
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
    return handle.terminate() if isinstance(handle, MegatronGroup) else [handle.__ray_terminate__.remote()]


def kill_policy(handle: Any) -> None:
    """``ray.kill`` for a policy worker actor or a :class:`MegatronGroup`."""
    if isinstance(handle, MegatronGroup):
        handle.kill()
    else:
        ray.kill(handle, no_restart=True)
