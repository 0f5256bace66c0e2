"""The code that runs inside the Ray actors: the policy worker (actor or reference) and the rollout worker.

Workers pick their engine from the config inside their own process (an engine may hold a GPU or start
processes of its own, e.g. vLLM), so the controller never imports an engine.
"""

from __future__ import annotations

import os
from typing import Any

import ray
import torch
from torch import Tensor

from lingshu_rl.config import ModelConfig, RolloutConfig, TrainConfig
from lingshu_rl.data.vision import VisionInputs
from lingshu_rl.models.transfer import Rendezvous, TensorSpec, WeightChannel
from lingshu_rl.rollout.factory import make_rollout_engine
from lingshu_rl.rollout.protocol import Generation, SamplingParams
from lingshu_rl.train.group import EngineActor
from lingshu_rl.train.protocol import TrainEngine


def _set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def make_train_engine(model_path: str, model_cfg: ModelConfig, train_cfg: TrainConfig, total_steps: int,
                      trainable: bool, lr: float | None = None) -> TrainEngine:
    if train_cfg.strategy == "fsdp2":
        raise ValueError("train.strategy=fsdp2 runs as a group of rank actors (lingshu_rl.train.group.PolicyGroup), "
                         "not inside one worker")
    if train_cfg.engine == "torch":
        from lingshu_rl.train.torch_engine import TorchEngine

        return TorchEngine(model_path, model_cfg, train_cfg, total_steps, trainable, lr)
    if train_cfg.engine == "megatron":  # one rank in this process; more ranks: a PolicyGroup (placement.py)
        if train_cfg.tensor_parallel_size != 1:
            raise ValueError("a megatron engine with tensor_parallel_size > 1 runs as a Ray actor group "
                             "(lingshu_rl.train.group.PolicyGroup), not inside one worker")
        import socket

        from lingshu_rl.train.megatron.engine import MegatronEngine

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return MegatronEngine(model_path, model_cfg, train_cfg, total_steps, trainable, lr, master_port=port,
                              seed=torch.initial_seed())
    raise ValueError(f"unknown training engine {train_cfg.engine!r}")


class PolicyWorker(EngineActor):
    """The actor (trainable) or the reference policy (frozen) around a training engine."""

    def __init__(self, model_path: str, model_cfg: ModelConfig, train_cfg: TrainConfig, total_steps: int,
                 trainable: bool, seed: int, threads: int = 0, lr: float | None = None):
        _set_threads(threads)
        torch.manual_seed(seed)
        self.engine = make_train_engine(model_path, model_cfg, train_cfg, total_steps, trainable, lr)


class RolloutWorker:
    """Generates responses for token-id prompts; receives new weights after every update."""

    def __init__(self, model_path: str, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, device: str = "auto",
                 threads: int = 0, vllm_cpu_threads: int | None = 1):
        _set_threads(threads)
        self.engine = make_rollout_engine(model_path, model_cfg, rollout_cfg, device, vllm_cpu_threads)
        self.channel: WeightChannel | None = None

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: list[VisionInputs | ray.ObjectRef | None] | None = None) -> list[Generation]:
        """``images[i]``: prompt i's images, or where they wait in Ray's object store (fetched here)."""
        resolved: list[VisionInputs | None] | None = None
        if images is not None:
            refs = [v for v in images if isinstance(v, ray.ObjectRef)]
            fetched = dict(zip(refs, ray.get(refs)))
            resolved = [fetched[v] if isinstance(v, ray.ObjectRef) else v for v in images]
        return self.engine.generate(prompts, params, resolved)

    def load_weights(self, weights: dict[str, Tensor]) -> None:
        self.engine.load_weights(weights)

    def join_weight_sync(self, rendezvous: Rendezvous, rank: int, manifest: list[TensorSpec],
                         bucket_bytes: int) -> None:
        """Join the trainer's weight-sync group as ``rank`` (:mod:`lingshu_rl.models.transfer`)."""
        self.channel = WeightChannel(rendezvous, rank, manifest, bucket_bytes, self.engine.device)

    def receive_weights(self) -> None:
        """Load the weights the trainer is broadcasting, bucket by bucket, as they arrive."""
        assert self.channel is not None, "join_weight_sync first"
        stream = self.channel.receive()
        self.engine.load_weights(stream)
        for _ in stream:  # a loader that stopped early: the group's broadcasts must still be taken
            pass

    def score(self, prompt: list[int], response: list[int], vision: VisionInputs | None = None) -> list[float]:
        return self.engine.score(prompt, response, vision)

    def probe(self, prompt: list[int], response: list[int], vision: VisionInputs | None,
              modules: list[str]) -> dict[str, Tensor]:
        return self.engine.probe(prompt, response, vision, modules)

    def pid(self) -> int:
        return os.getpid()


class HybridWorker:
    """The actor, the reference policy and one rollout engine in one process (``cluster.hybrid``), as verl's
    hybrid engine: the phases take turns on the same cores (or GPU) without switching processes (on a 2-core
    machine the same update ran 0.23 s in one process and 0.3-0.5 s in an actor process of its own, between a
    generation in another), and new weights go to the rollout engine in place: no channel, no copy but vLLM's
    own. The controller sees the three roles as usual, through one :class:`Facet` each."""

    def __init__(self, model_path: str, ref_path: str | None, model_cfg: ModelConfig, train_cfg: TrainConfig,
                 rollout_cfg: RolloutConfig, total_steps: int, seed: int, device: str, threads: int):
        _set_threads(threads)  # first: vLLM keeps the threads it finds (and the trainer shares them)
        self.actor = PolicyWorker(model_path, model_cfg, train_cfg, total_steps, True, seed)
        self.ref = PolicyWorker(ref_path, model_cfg, train_cfg, total_steps, False, seed) if ref_path else None
        self.rollout = RolloutWorker(model_path, model_cfg, rollout_cfg, device, vllm_cpu_threads=None)

    def call(self, role: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """``method`` of ``role`` ("actor", "ref" or "rollout")."""
        return getattr(getattr(self, role), method)(*args, **kwargs)

    def sync_in_place(self) -> None:
        """The actor's weights into the rollout engine, tensor by tensor from the actor's own parameters."""
        self.rollout.engine.load_weights(self.actor.engine.hf_tensors())


class Facet:
    """One role of a :class:`HybridWorker`, called as that role's own actor: ``facet.update.remote(batch, loss)``
    runs ``actor.update(batch, loss)`` in the hybrid worker (Ray's own ``__ray_*__`` calls go to the worker)."""

    def __init__(self, handle: Any, role: str):
        self.handle, self.role = handle, role

    def __getattr__(self, method: str) -> Any:
        if method.startswith("__ray"):
            return getattr(self.handle, method)
        return _FacetMethod(self.handle, self.role, method)


class _FacetMethod:
    def __init__(self, handle: Any, role: str, method: str):
        self.handle, self.role, self.method = handle, role, method

    def remote(self, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        return self.handle.call.remote(self.role, self.method, *args, **kwargs)
