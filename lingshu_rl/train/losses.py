"""The supervised loss (negative log-likelihood on the response tokens) in the engine's loss contract."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lingshu_rl.train.batch import TokenBatch


@dataclass
class SFTLoss:
    temperature: float = 1.0
    needs_entropy: bool = False

    def __call__(self, logprobs: Tensor, entropy: Tensor | None, batch: TokenBatch, num_tokens: float,
                 num_seqs: float) -> tuple[Tensor, dict[str, Tensor]]:
        loss = -(logprobs * batch.response_mask).sum() / num_tokens
        return loss, {"sft/loss": loss.detach()}
