"""What the controller needs from a training engine, and what a loss looks like to an engine."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import Tensor

from lingshu_rl.train.batch import TokenBatch


class Loss(Protocol):
    """A micro-batch loss. ``num_tokens``/``num_seqs`` are totals over the whole update so that summing the
    micro-batch losses (and metrics) gives the full-batch value."""

    temperature: float  # log-probs are computed from logits / temperature
    needs_entropy: bool

    def __call__(self, logprobs: Tensor, entropy: Tensor | None, batch: TokenBatch, num_tokens: float,
                 num_seqs: float) -> tuple[Tensor, dict[str, Tensor]]: ...


class TrainEngine(Protocol):
    def logprobs(self, batch: TokenBatch, temperature: float) -> Tensor:
        """Per-token log-probs ``[N, T]`` without gradients."""

    def update(self, batch: TokenBatch, loss: Loss) -> dict[str, float]:
        """One or more optimiser updates on ``batch`` (micro-batched); returns metrics."""

    def weights(self) -> dict[str, Tensor]:
        """Full weights under Hugging Face names (for the rollout engine and exports)."""

    def save(self, directory: Path) -> None:
        """Hugging Face model (safetensors) plus optimiser and scheduler state."""

    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote."""
