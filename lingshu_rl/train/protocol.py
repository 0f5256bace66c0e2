"""What the controller needs from a training engine, and what a loss looks like to an engine."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import Tensor

from lingshu_rl.train.batch import TokenBatch


class Loss(Protocol):
    """A micro-batch loss. ``num_tokens``/``num_seqs`` are totals over the whole update so that summing the
    micro-batch losses (and metrics) gives the full-batch value."""

    # read-only members: a dataclass field (SFTLoss) or a property (GRPOLoss.needs_entropy) both provide them

    @property
    def temperature(self) -> float:
        """Log-probs are computed from logits / temperature."""

    @property
    def needs_entropy(self) -> bool:
        """Whether the engine must pass the per-token entropy (else it passes ``None``)."""

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

    def load_training_state(self, directory: Path) -> None:
        """Restore the optimiser and scheduler state that :meth:`save` wrote (the model weights are loaded from
        ``directory/model`` when the engine is built)."""
