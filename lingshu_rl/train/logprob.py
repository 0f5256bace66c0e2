"""Per-token log-probabilities and entropies, the math every training engine shares.

Shapes: N sequences, T positions, H hidden size, V vocabulary. A value for the token at position t sits at t
(it comes from the logits of position t - 1); position 0 holds 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_logprobs(logits: Tensor, input_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each token under the logits of the previous position: ``[N, T]`` (position 0 -> 0).

    Logits are divided by the sampling temperature so the policy matches the distribution sampled from.
    """
    logits = logits[:, :-1].float() / temperature
    targets = input_ids[:, 1:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.nn.functional.pad(picked, (1, 0), value=0.0)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-position entropy of the next-token distribution, aligned like :func:`token_logprobs`."""
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.nn.functional.pad(entropy, (1, 0), value=0.0)


def response_logprobs(hidden: Tensor, head: torch.nn.Module, input_ids: Tensor, response_mask: Tensor,
                      temperature: float = 1.0, with_entropy: bool = False, chunk: int = 1024
                      ) -> tuple[Tensor, Tensor | None]:
    """:func:`token_logprobs` (and :func:`entropy_from_logits`) at the response tokens only, zero elsewhere.

    ``hidden`` ``[N, T, H]`` are the final hidden states and ``head`` the output projection. Logits are formed
    for at most ``chunk`` response positions at a time, in float32: memory is ``chunk x V``, never ``N x T x V``
    (a 1,024-token prompt costs its hidden states, not its logits).
    """
    rows, cols = (response_mask[:, 1:] > 0).nonzero(as_tuple=True)  # predicting positions t - 1 of response tokens
    targets = input_ids[rows, cols + 1]
    states = hidden[rows, cols]  # [K, H]
    picked, entropies = [], []
    for start in range(0, len(targets), chunk):
        logits = head(states[start:start + chunk]).float() / temperature  # [k, V]
        log_norm = torch.logsumexp(logits, dim=-1)
        picked.append(logits.gather(-1, targets[start:start + chunk, None]).squeeze(-1) - log_norm)
        if with_entropy:
            entropies.append(log_norm - (logits.softmax(dim=-1) * logits).sum(-1))
    shape = input_ids.shape

    def scatter(values: list[Tensor]) -> Tensor:
        # no response token (a blank row): still a graph through every layer, so backward reaches them all
        flat = torch.cat(values) if values else states.float().sum(-1) * 0
        out = torch.zeros(shape, dtype=torch.float32, device=hidden.device)
        return out.index_put((rows, cols + 1), flat)

    return scatter(picked), scatter(entropies) if with_entropy else None
