"""The megatron engine's optimiser: AdamW on float32 main weights, its state whole on every data-parallel replica or
split over the replicas (``train.distributed_optimizer``, ZeRO stage 1).

Split: each trainable tensor has one owner replica (tensors dealt largest first to the least-loaded replica, the
same deal on every rank). Its gradient is reduced to the owner instead of all-reduced, and the other replicas drop
theirs at once; the owner alone keeps the float32 main copy and the two Adam moments (12 bytes per parameter, so
per rank 1/D of them), steps them and broadcasts the updated tensor to the other replicas. The arithmetic is the
whole state's: the gradient norm sums every rank's owned tensors, so both give the same weights.

Checkpoints: ``megatron/optimizer_tp{r}.pt`` (whole, written by the first replica) or ``optimizer_tp{r}_dp{d}.pt``
(replica d's share) hold each tensor's main copy and moments under its megatron name, so a run resumes at another
data-parallel size, split or not.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from lingshu_rl.config import TrainConfig
from lingshu_rl.train.optim import check_lr_groups, make_optimizer


def deal_by_size(sizes: list[int], replicas: int) -> list[int]:
    """The owner replica of each tensor: largest first, each to the replica holding the fewest elements so far."""
    load = [0] * replicas
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner = min(range(replicas), key=lambda r: (load[r], r))
        owners[i] = owner
        load[owner] += sizes[i]
    return owners


class ReplicaOptimizer:
    """AdamW and its schedule over ``named`` = (megatron name, Hugging Face name, parameter) of one rank.

    ``tp_group``/``dp_group``: this rank's tensor-parallel group and data-parallel group (the ranks holding the same
    shard in the other replicas)."""

    def __init__(self, named: list[tuple[str, str, torch.nn.Parameter]], cfg: TrainConfig, total_steps: int,
                 lr: float | None, tp_group: ProcessGroup, dp_group: ProcessGroup, distributed: bool):
        self.names = [name for name, _, _ in named]
        self.params = [p for _, _, p in named]
        self.tp_group, self.dp_group = tp_group, dp_group
        self.tp_rank = torch.distributed.get_rank(tp_group)
        self.dp_rank, self.dp_size = torch.distributed.get_rank(dp_group), torch.distributed.get_world_size(dp_group)
        self.distributed = distributed and self.dp_size > 1
        # the same deal on every rank of a replica: megatron splits each tensor evenly over the tensor-parallel ranks
        owners = deal_by_size([p.numel() for p in self.params], self.dp_size) if self.distributed else \
            [self.dp_rank] * len(self.params)
        self.sources = [torch.distributed.get_global_rank(dp_group, o) for o in owners]  # where each tensor is kept
        self.owned = [o == self.dp_rank for o in owners]
        if not any(self.owned):
            raise ValueError(f"train.data_parallel_size={self.dp_size} is more than the {len(self.params)} trainable "
                             f"tensors it splits the optimiser over: set train.distributed_optimizer=false")
        # float32 main weights for the half-precision parameters (megatron keeps its norms in float32): the optimizer
        # updates these and the model's copies are refreshed from them after every step (a bf16 update of 1e-6 would
        # round to nothing)
        self.main: list[torch.nn.Parameter | None] = [
            (p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float())) if own else None
            for p, own in zip(self.params, self.owned)]
        check_lr_groups([hf for _, hf, _ in named], cfg)  # every glob matches somewhere, not necessarily here
        self.optimizer, self.scheduler = make_optimizer(
            [(hf, m) for (_, hf, _), m in zip(named, self.main) if m is not None], cfg, total_steps, lr)
        # gradients accumulate over the micro-batches in float32 (megatron's main_grad), as the torch engine's
        # float32 masters' do: each backward's bf16 gradient is added here and dropped
        self.grads: list[Tensor | None] = [None] * len(self.params)
        for index, param in enumerate(self.params):
            param.register_post_accumulate_grad_hook(functools.partial(self._accumulate, index))

    def _accumulate(self, index: int, param: torch.nn.Parameter) -> None:
        assert param.grad is not None  # the hook runs after autograd wrote it
        grad, param.grad = param.grad.float(), None  # float(): the same tensor when already float32
        held = self.grads[index]
        self.grads[index] = grad if held is None else held.add_(grad)

    def reduce_gradients(self) -> None:
        """Sum each gradient over the replicas (to its owner when split; the others drop theirs), then over the
        tensor-parallel group for the sequence-parallel norms (each rank's saw its share of the sequence)."""
        for index, (param, source, own) in enumerate(zip(self.params, self.sources, self.owned)):
            grad = self.grads[index]
            if self.dp_size > 1:
                if grad is None:  # this replica formed none (its rows had no image): it adds zero
                    grad = torch.zeros_like(param, dtype=torch.float32)
                if self.distributed:
                    torch.distributed.reduce(grad, dst=source, group=self.dp_group)
                else:
                    torch.distributed.all_reduce(grad, group=self.dp_group)
            if own and grad is not None and getattr(param, "sequence_parallel", False):
                torch.distributed.all_reduce(grad, group=self.tp_group)
            self.grads[index] = grad if own else None

    def clip_grad_norm(self, max_norm: float) -> float:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model: squared norms of the kept gradients summed over
        the tensor-parallel group (replicated tensors counted on its rank 0) and, when split, over the replicas."""
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        kept = [(param, grad) for param, grad in zip(self.params, self.grads) if grad is not None]
        squares = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        for param, grad in kept:
            if param_is_not_tensor_parallel_duplicate(param):
                squares += grad.square().sum()
        torch.distributed.all_reduce(squares, group=self.tp_group)
        if self.distributed:
            torch.distributed.all_reduce(squares, group=self.dp_group)
        total = squares.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for _, grad in kept:
            grad.mul_(coef)
        return float(total)

    def step(self) -> None:
        for main, grad in zip(self.main, self.grads):
            if main is not None:
                main.grad = grad
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            for param, main in zip(self.params, self.main):
                if main is not None and main is not param:
                    param.copy_(main)
        self._share()

    def _share(self) -> None:
        """Split: every replica takes each tensor from its owner."""
        if self.distributed:
            for param, source in zip(self.params, self.sources):
                torch.distributed.broadcast(param.data, src=source, group=self.dp_group)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.grads = [None] * len(self.params)
        for param in self.params:
            param.grad = None

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # --- checkpoints ------------------------------------------------------------------------------------------

    def save(self, directory: Path, tp_size: int) -> None:
        """This rank's share (split), or the whole state from the first replica."""
        if not self.distributed and self.dp_rank != 0:
            return
        suffix = f"_dp{self.dp_rank}" if self.distributed else ""
        path = Path(directory) / "megatron" / f"optimizer_tp{self.tp_rank}{suffix}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, main in zip(self.names, self.main):
            if main is not None:
                moments = self.optimizer.state.get(main, {})
                tensors[name] = {"main": main.detach().cpu(), **{k: v.cpu() for k, v in moments.items()}}
        torch.save({"tp_size": tp_size, "rank": self.tp_rank, "scheduler": self.scheduler.state_dict(),
                    "tensors": tensors}, path)

    def load(self, directory: Path, tp_size: int) -> None:
        """Each kept tensor's main copy and moments from whichever file of this tensor-parallel rank holds it."""
        folder = Path(directory) / "megatron"
        pattern = re.compile(rf"optimizer_tp{self.tp_rank}(_dp\d+)?\.pt")
        files = sorted(p for p in folder.glob(f"optimizer_tp{self.tp_rank}*.pt") if pattern.fullmatch(p.name)) \
            if folder.is_dir() else []
        if not files:
            raise FileNotFoundError(f"{folder}/optimizer_tp{self.tp_rank}*.pt: no megatron optimiser state (was the "
                                    f"checkpoint written by the megatron engine with tensor_parallel_size={tp_size}?)")
        saved: dict[str, dict[str, Tensor]] = {}
        for path in files:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state["tp_size"] != tp_size:
                raise ValueError(f"{path} was written with tensor_parallel_size={state['tp_size']}, "
                                 f"this run uses {tp_size}")
            if "tensors" not in state:
                raise ValueError(f"{path} holds the optimiser state as lingshu_rl wrote it before the split "
                                 f"optimiser (by position, not by tensor name); it cannot be resumed by this version")
            scheduler = state["scheduler"]
            saved.update(state["tensors"])
        self.scheduler.load_state_dict(scheduler)
        missing = [n for n, m in zip(self.names, self.main) if m is not None and n not in saved]
        if missing:
            raise ValueError(f"{folder} holds no optimiser state for {missing[:3]} ({len(missing)} tensors)")
        with torch.no_grad():  # the float32 main weights exactly (the exported model holds them rounded)
            for name, param, main in zip(self.names, self.params, self.main):
                if main is None:
                    continue
                entry = saved[name]
                main.copy_(entry["main"])
                param.copy_(entry["main"])
                moments = {k: v.to(main.device) if k != "step" else v for k, v in entry.items() if k != "main"}
                if moments:
                    self.optimizer.state[main] = moments
        self._share()
