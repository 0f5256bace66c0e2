"""What the controller needs from a training engine, and what a loss looks like to an engine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

from lingshu_rl.train.batch import TokenBatch

if TYPE_CHECKING:
    from lingshu_rl.train.split import MiniBatch


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
    def logprobs(self, batch: TokenBatch, temperature: float, micro_batches: int = 0) -> Tensor:
        """Per-token log-probs ``[N, T]`` without gradients (at least ``micro_batches`` forward passes: ranks
        of a data-parallel group run as many as the busiest)."""

    def update(self, work: TokenBatch | list[MiniBatch], loss: Loss) -> dict[str, float]:
        """``train.updates_per_step`` optimiser updates on a whole batch, or on this rank's planned share of one
        (:func:`lingshu_rl.train.split.plan_updates`); returns metrics."""

    def weights(self) -> dict[str, Tensor]:
        """Full weights under Hugging Face names (for the rollout engine and exports)."""

    def save(self, directory: Path) -> None:
        """Hugging Face model (safetensors) plus optimiser and scheduler state."""

    def load_training_state(self, directory: Path) -> None:
        """Restore the training state that :meth:`save` wrote (the engine was built from ``directory/model``)."""
