"""The tensor batch the training engines consume."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class TokenBatch:
    """N sequences of prompt + response tokens, right-padded to length T.

    Per-token tensors are aligned with ``input_ids``; ``response_mask`` is 1 on the tokens being learnt.
    """

    input_ids: Tensor  # [N, T] long
    attention_mask: Tensor  # [N, T] long, 1 on real tokens
    response_mask: Tensor  # [N, T] float, 1 on response tokens
    advantages: Tensor | None = None  # [N] GRPO advantage per sequence
    old_logprobs: Tensor | None = None  # [N, T] policy log-probs before the update (None: on-policy, use current)
    ref_logprobs: Tensor | None = None  # [N, T] reference-policy log-probs for the KL term

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: slice | Tensor) -> TokenBatch:
        """Rows ``index`` of every tensor, trimmed to the longest remaining sequence."""
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        picked = {k: (v[index] if v is not None else None) for k, v in picked.items()}
        length = int(picked["attention_mask"].sum(dim=1).max().item()) if len(picked["input_ids"]) else 0
        return TokenBatch(**{k: (v[:, :length] if v is not None and v.dim() == 2 else v) for k, v in picked.items()})

    def chunks(self, size: int) -> list[TokenBatch]:
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    def with_(self, **changes: Tensor | None) -> TokenBatch:
        return replace(self, **changes)


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> TokenBatch:
    """Concatenate prompt and response token ids per sequence and right-pad them into a batch."""
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    n = len(prompts)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    response_mask = torch.zeros((n, length), dtype=torch.float32)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        total = len(prompt) + len(response)
        input_ids[i, :total] = torch.tensor([*prompt, *response], dtype=torch.long)
        attention_mask[i, :total] = 1
        response_mask[i, len(prompt):total] = 1.0
    return TokenBatch(input_ids, attention_mask, response_mask)
