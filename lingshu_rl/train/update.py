"""The one optimiser-update loop every training engine runs: micro-batches, loss aggregation, agreement
across data-parallel ranks, NaN skipping, gradient clipping, the optimiser step.

An engine supplies the model-specific parts (:class:`StepEngine`): per-token log-probs (and entropy) of a
micro-batch, backward, the global gradient norm, the optimiser step and a sum over its data-parallel group.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Protocol

from torch import Tensor

from lingshu_rl.train.batch import TokenBatch
from lingshu_rl.train.protocol import Loss
from lingshu_rl.train.split import MiniBatch, blank_row


class StepEngine(Protocol):
    @property
    def max_grad_norm(self) -> float:
        """Gradient clipping threshold (0: no clipping)."""

    def forward(self, micro: TokenBatch, temperature: float, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probs ``[n, T]`` (with gradients) and, if asked, entropy, of ``micro``."""

    def backward(self, loss: Tensor) -> None: ...

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the gradients to ``max_norm`` (inf: do not clip); return the global norm before clipping."""

    def step(self) -> None:
        """Optimiser and scheduler step."""

    def lr(self) -> float:
        """The learning rate of the next step."""

    def zero_grad(self) -> None: ...

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the data-parallel group (identity without one)."""


def run_updates(engine: StepEngine, minis: list[MiniBatch], loss: Loss, micro_batch_size: int) -> dict[str, float]:
    """One optimiser update per mini-batch; metrics averaged over the updates, ``actor/nan_skipped`` summed."""
    per_update = [_update_once(engine, mini, loss, micro_batch_size) for mini in minis]
    metrics = {key: sum(m[key] for m in per_update) / len(per_update) for key in per_update[0]}
    metrics["actor/nan_skipped"] = float(sum(m["actor/nan_skipped"] for m in per_update))
    return metrics


def _update_once(engine: StepEngine, mini: MiniBatch, loss: Loss, micro_batch_size: int) -> dict[str, float]:
    engine.zero_grad()
    micros = mini.batch.chunks(micro_batch_size)
    micros += [blank_row(mini.batch)] * (mini.micro_batches - len(micros))
    sums: dict[str, float] = defaultdict(float)
    finite = True
    for micro in micros:
        logprobs, entropy = engine.forward(micro, loss.temperature, loss.needs_entropy)
        value, metrics = loss(logprobs, entropy, micro, mini.num_tokens, mini.num_seqs)
        # every rank runs every backward (its peers' collectives wait for it); a non-finite loss skips the step
        finite = finite and math.isfinite(float(value.detach()))
        engine.backward(value)
        for key, metric in metrics.items():
            sums[key] += float(metric)
    keys = sorted(sums)
    reduced = engine.all_reduce_sum([sums[k] for k in keys] + [0.0 if finite else 1.0])
    totals, finite = dict(zip(keys, reduced)), reduced[-1] == 0.0
    grad_norm = engine.clip_grad_norm(engine.max_grad_norm or float("inf")) if finite else float("nan")
    finite = finite and math.isfinite(grad_norm)
    if finite:
        engine.step()
    engine.zero_grad()
    return {**totals, "actor/grad_norm": grad_norm, "actor/lr": engine.lr(),
            "actor/nan_skipped": 0.0 if finite else 1.0}
