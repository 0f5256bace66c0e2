"""GRPO math as pure functions. Shapes: B prompts, n responses each, N = B*n sequences, T token positions.

Per-token tensors are aligned with ``input_ids``: the value for the token at position t sits at t, and
``mask`` is 1 exactly on response tokens (prompt and padding are 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

EQUAL_REWARD_RTOL = 1e-6  # rewards closer than this (relative to max(1, |reward|)) count as equal


def equal_reward_groups(rewards: Tensor, rtol: float = EQUAL_REWARD_RTOL) -> Tensor:
    """A ``[B]`` bool mask of groups ``[B, n]`` whose rewards are all equal, up to float noise.

    Eight float32 0.1s have a mean off by ~1e-9 and a std of ~1e-8 instead of 0; with a plain ``max > min``
    test such a group looks informative and its noise, divided by that std, becomes a one-signed advantage.
    """
    r = rewards.double()
    spread = r.max(dim=1).values - r.min(dim=1).values
    return spread <= rtol * r.abs().max(dim=1).values.clamp(min=1.0)


def group_advantages(rewards: Tensor, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """Group-normalised advantages from outcome rewards ``[B, n]`` -> ``[B, n]`` (same dtype).

    ``group``: (r - group mean) / (group std + eps)   (GRPO; std with Bessel's correction, as verl)
    ``batch``: (r - group mean) / (batch std + eps)
    ``none``:  r - group mean                          (Dr. GRPO: no std scaling)
    Computed in float64, and a group whose rewards are all equal (:func:`equal_reward_groups`) gets exactly 0
    in every mode: float noise in its mean and std is never amplified into a signal. verl computes the
    float32 formula as written and gives such groups small advantages of one sign (e.g. +-0.0075 for 0.1s).
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"unknown advantage scale {scale!r}; choose group, batch or none")
    r = rewards.double()
    advantages = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        advantages = advantages / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        advantages = advantages / (r.std() + eps)
    return advantages.masked_fill(equal_reward_groups(r).unsqueeze(1), 0.0).to(rewards.dtype)


def informative_groups(rewards: Tensor) -> Tensor:
    """Dynamic sampling (DAPO): a ``[B]`` bool mask of groups whose rewards are not all equal."""
    return ~equal_reward_groups(rewards)


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL(policy || reference) estimates from sampled tokens ``[N, T]`` (Schulman's k1/k2/k3).

    k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r with log r = logp - ref_logp.
    k3 is unbiased and always >= 0 (verl's ``low_var_kl``; clamped to [-10, 10] as there).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        neg = (-log_ratio).clamp(-20.0, 20.0)
        return (neg.exp() - 1.0 - neg).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k2 or k3")


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_low: float,
                        clip_high: float) -> tuple[Tensor, Tensor]:
    """PPO-clip with separate bounds (DAPO clip-higher): per-token loss ``[N, T]`` and clipped flags.

    ``advantages`` is ``[N]`` (one outcome advantage per sequence), broadcast over tokens.
    loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(-1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped)


def aggregate(per_token: Tensor, mask: Tensor, mode: str, num_tokens: float, num_seqs: float) -> Tensor:
    """Reduce a per-token quantity ``[N, T]`` to a scalar.

    ``num_tokens`` / ``num_seqs`` are the totals over the whole update (all micro-batches and ranks), so summing
    this over micro-batches gives exactly the full-batch value: gradient accumulation changes nothing.
    ``num_seqs`` counts only the sequences that contribute, those with at least one masked-in token
    (:func:`lingshu_rl.train.batch.loss_totals`): a sequence whose mask was zeroed (``grpo.mask_truncated``) adds
    0 to the sums and must not dilute the mean of the others.
      token-mean:           sum of all tokens / num_tokens         (DAPO; every token weighs the same)
      seq-mean-token-mean:  sum over seqs of (seq token mean) / num_seqs   (original GRPO)
      seq-mean-token-sum:   sum over seqs of (seq token sum) / num_seqs
    """
    masked = per_token * mask
    if mode == "token-mean":
        return masked.sum() / num_tokens
    if mode == "seq-mean-token-mean":
        return (masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)).sum() / num_seqs
    if mode == "seq-mean-token-sum":
        return masked.sum() / num_seqs
    raise ValueError(f"unknown loss aggregation {mode!r}")
