"""The GRPO micro-batch loss: PPO-clip policy term + KL to the reference - entropy bonus.

When the batch carries the rollout engine's sampling log-probs, the loss also reports their mismatch with
the training engine's (``rollout/logprob_abs_diff``) and, with ``tis_cap > 0``, applies truncated importance
sampling to the policy term: each token's loss is weighted by min(exp(train_logp_old - rollout_logp), tis_cap),
a constant (no gradient), which corrects for the two engines computing slightly different distributions.

Which distribution the ratio uses: both log-probs are of the sampled token under softmax(logits / temperature)
over the full vocabulary, the policy the training engine computes; the rollout engine returns that distribution
too (:mod:`lingshu_rl.rollout.vllm_engine`), also when it samples with top_p < 1 or top_k > 0. The ratio
therefore measures only the numerical difference between the two engines; top-p/top-k truncation is not part of
it (as in verl and TRL, the loss does not correct for the truncation). Comparing against log-probs
renormalised over the kept tokens instead would bias the metric by log(kept mass) and make every weight < 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lingshu_rl.grpo.algorithm import aggregate, clipped_policy_loss, kl_estimate
from lingshu_rl.train.batch import TokenBatch


@dataclass
class GRPOLoss:
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_agg: str = "token-mean"
    entropy_coef: float = 0.0
    temperature: float = 1.0
    tis_cap: float = 0.0  # truncated importance-sampling cap; 0 disables the correction

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coef != 0.0

    def __call__(self, logprobs: Tensor, entropy: Tensor | None, batch: TokenBatch, num_tokens: float,
                 num_seqs: float) -> tuple[Tensor, dict[str, Tensor]]:
        assert batch.advantages is not None, "GRPO needs advantages in the batch"
        mask = batch.response_mask
        old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()

        def agg(x: Tensor, mode: str = self.loss_agg) -> Tensor:
            return aggregate(x, mask, mode, num_tokens, num_seqs)

        pg_per_token, clipped = clipped_policy_loss(logprobs, old, batch.advantages, self.clip_low, self.clip_high)
        metrics = {"actor/clipfrac": agg(clipped.float(), "token-mean"), "actor/logprob_mean": agg(old, "token-mean")}
        if batch.rollout_logprobs is not None:  # [N, T] behaviour log-probs from the rollout engine
            rollout = batch.rollout_logprobs.to(old.device)
            # the trainer's current log-probs against the sampler's: the engines' mismatch (and, with
            # grpo.one_step_off, where old is the sampler's own, the one step of staleness)
            metrics["rollout/logprob_abs_diff"] = agg((logprobs.detach() - rollout).abs(), "token-mean")
            if self.tis_cap > 0:
                weight = (old - rollout).clamp(max=20.0).exp().clamp(max=self.tis_cap)
                pg_per_token = pg_per_token * weight
                metrics["rollout/tis_weight_mean"] = agg(weight, "token-mean")
        pg_loss = agg(pg_per_token)
        loss = pg_loss
        metrics["actor/pg_loss"] = pg_loss.detach()
        if batch.ref_logprobs is not None:
            kl = kl_estimate(logprobs, batch.ref_logprobs, self.kl_estimator)
            kl_loss = agg(kl)
            loss = loss + self.kl_coef * kl_loss
            metrics["actor/kl"] = agg(kl.detach(), "token-mean")
        if entropy is not None:
            entropy_mean = agg(entropy)
            loss = loss - self.entropy_coef * entropy_mean
            metrics["actor/entropy"] = entropy_mean.detach()
        metrics["actor/loss"] = loss.detach()
        return loss, metrics
