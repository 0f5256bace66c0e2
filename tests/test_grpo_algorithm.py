"""GRPO math against hand-computed values, and against verl's own implementations where installed."""

import math

import pytest
import torch

from lingshu_rl.grpo.algorithm import (
    aggregate,
    clipped_policy_loss,
    group_advantages,
    informative_groups,
    kl_estimate,
)
from lingshu_rl.grpo.loss import GRPOLoss
from lingshu_rl.train.batch import TokenBatch, collate
from lingshu_rl.train.logprob import token_logprobs
from lingshu_rl.train.optim import lr_factor


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # group 0: mean 0.5, unbiased std sqrt(1/3) = 0.57735 -> +-0.5 / 0.57735 = +-0.866025
    adv = group_advantages(rewards, "group")
    assert adv[0].tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # all equal: no signal, no NaN
    assert group_advantages(rewards, "none")[0].tolist() == [0.5, -0.5, -0.5, 0.5]  # Dr. GRPO
    batch_std = rewards.std().item()  # 8 values, three zeros: std = 0.46291
    assert group_advantages(rewards, "batch")[0, 0].item() == pytest.approx(0.5 / (batch_std + 1e-6))
    assert informative_groups(rewards).tolist() == [True, False]
    with pytest.raises(ValueError, match="group, batch or none"):
        group_advantages(rewards, "bogus")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_groups_of_equal_rewards_get_exactly_zero_advantage(dtype: torch.dtype, scale: str) -> None:
    # float32: eight 0.1s have a mean off by 9e-9 and a std of 8e-9; divided by (std + 1e-6), that noise used to
    # become +-0.0075 for every sample of the group (the same computation as verl's)
    for value, other in ((0.1, 0.6), (0.6, 0.1), (1 / 3, 0.7), (0.7, 1 / 3)):
        rewards = torch.full((3, 8), value, dtype=dtype)
        rewards[1] = other
        rewards[2, :4] = 0.3 * value  # a real group: it keeps its signal
        adv = group_advantages(rewards, scale)
        assert adv.dtype == dtype
        assert adv[:2].eq(0).all(), (value, adv[:2])
        assert informative_groups(rewards).tolist() == [False, False, True]
        spread = value - 0.3 * value  # half the group at 0.3 v, half at v: centred +-spread/2
        expected = {"none": spread / 2, "group": (spread / 2) / (rewards[2].double().std().item() + 1e-6),
                    "batch": (spread / 2) / (rewards.double().std().item() + 1e-6)}[scale]
        assert adv[2, 4:].tolist() == pytest.approx([expected] * 4, rel=1e-6)
        assert adv[2, :4].tolist() == pytest.approx([-expected] * 4, rel=1e-6)


def test_equal_within_relative_tolerance_only() -> None:
    rewards = torch.tensor([[0.1] * 7 + [0.1 + 1e-9], [0.5] * 7 + [0.5001]], dtype=torch.float64)
    assert informative_groups(rewards).tolist() == [False, True]  # float noise vs. a real (small) difference
    assert group_advantages(rewards)[0].eq(0).all() and group_advantages(rewards)[1].abs().max() > 1


def test_update_on_groups_of_equal_rewards_has_no_gradient(tmp_path) -> None:
    from lingshu_rl.config import ModelConfig, TrainConfig
    from lingshu_rl.models.tiny import build_tiny_model
    from lingshu_rl.train.torch_engine import TorchEngine

    engine = TorchEngine(str(build_tiny_model(cache_dir=tmp_path)), ModelConfig(),
                         TrainConfig(lr=1e-3, micro_batch_size=4, device="cpu"), total_steps=2)
    before = {k: v.clone() for k, v in engine.weights().items()}
    rewards = torch.full((2, 8), 0.1)  # two groups of 0.1 and 0.6: as a weighted "0.1 + 0.5*format" gives
    rewards[1] = 0.6
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 100, (5,), generator=gen).tolist() for _ in range(16)]
    responses = [torch.randint(3, 100, (6,), generator=gen).tolist() for _ in range(16)]
    batch = collate(prompts, responses, pad_id=0).with_(advantages=group_advantages(rewards).flatten())
    metrics = engine.update(batch, GRPOLoss())
    assert metrics["actor/grad_norm"] == 0.0 and metrics["actor/pg_loss"] == 0.0
    assert all(torch.equal(v, before[k]) for k, v in engine.weights().items())


def test_kl_estimators_by_hand() -> None:
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    # log r = logp - ref = [0.5, -1.0]
    assert kl_estimate(logp, ref, "k1")[0].tolist() == pytest.approx([0.5, -1.0])
    assert kl_estimate(logp, ref, "k2")[0].tolist() == pytest.approx([0.125, 0.5])
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]  # exp(-log r) - 1 + log r
    assert kl_estimate(logp, ref, "k3")[0].tolist() == pytest.approx(k3, abs=1e-6)


def test_clipped_policy_loss_by_hand() -> None:
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[0.5, 1.1, 1.5, 1.2]]))  # ratios 0.5, 1.1, 1.5, 1.2
    loss, clipped = clipped_policy_loss(logp, old, torch.tensor([1.0]), clip_low=0.2, clip_high=0.28)
    # A > 0: max(-r, -clip(r, 0.8, 1.28)) -> [-0.5, -1.1, -1.28, -1.2]
    assert loss[0].tolist() == pytest.approx([-0.5, -1.1, -1.28, -1.2])
    assert clipped.tolist() == [[False, False, True, False]]
    loss, clipped = clipped_policy_loss(logp, old, torch.tensor([-2.0]), clip_low=0.2, clip_high=0.28)
    # A < 0: max(2r, 2 clip(r)) -> [1.6, 2.2, 3.0, 2.4]
    assert loss[0].tolist() == pytest.approx([1.6, 2.2, 3.0, 2.4])
    assert clipped.tolist() == [[True, False, False, False]]


def test_aggregation_modes_by_hand() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(values, mask, "token-mean", 4, 2).item() == pytest.approx(10 / 4)
    assert aggregate(values, mask, "seq-mean-token-mean", 4, 2).item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum", 4, 2).item() == pytest.approx((6.0 + 4.0) / 2)
    # micro-batches summed with global totals equal the full batch
    halves = [aggregate(values[i:i + 1], mask[i:i + 1], "seq-mean-token-mean", 4, 2) for i in range(2)]
    assert sum(halves).item() == pytest.approx(3.0)


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum", "token-mean"])
def test_masked_sequences_do_not_dilute_the_loss(tmp_path, mode: str) -> None:
    """Truncation masking (grpo.mask_truncated) zeroes a sequence's mask: the update must equal the update on
    the contributing sequences alone, micro-batched or not (sequence means divide by contributing sequences)."""
    from lingshu_rl.config import ModelConfig, TrainConfig
    from lingshu_rl.models.tiny import build_tiny_model
    from lingshu_rl.train.batch import loss_totals
    from lingshu_rl.train.torch_engine import TorchEngine

    path = str(build_tiny_model(cache_dir=tmp_path))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 100, (4 + i,), generator=gen).tolist() for i in range(4)]
    responses = [torch.randint(3, 100, (6 - i,), generator=gen).tolist() for i in range(4)]
    advantages = torch.tensor([1.0, -0.5, -1.5, 2.0])
    full = collate(prompts, responses, pad_id=0).with_(advantages=advantages)
    truncated = torch.tensor([False, True, False, True])
    masked = full.with_(response_mask=full.response_mask * (~truncated).float().unsqueeze(-1))  # as the controller
    kept = collate(prompts[::2], responses[::2], pad_id=0).with_(advantages=advantages[::2])
    assert loss_totals(masked) == loss_totals(kept) == (float(len(responses[0]) + len(responses[2])), 2.0)

    loss = GRPOLoss(loss_agg=mode, entropy_coef=0.01)
    results = []
    for batch, micro in ((masked, 1), (kept, 2)):
        engine = TorchEngine(path, ModelConfig(), TrainConfig(lr=1e-3, micro_batch_size=micro, device="cpu"))
        results.append((engine.update(batch, loss), engine.weights()))
    (with_masked, w_masked), (alone, w_alone) = results
    for key in ("actor/pg_loss", "actor/entropy", "actor/loss", "actor/grad_norm"):
        assert with_masked[key] == pytest.approx(alone[key], rel=1e-5), key
    # AdamW's first step moves each weight by about lr * sign(grad): float noise in near-zero gradients is all
    # that separates the two updates, a small fraction of one step
    assert max((w_masked[k] - w_alone[k]).abs().max().item() for k in w_alone) < 0.05 * 1e-3


def test_token_logprobs_alignment() -> None:
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # position 0 predicts token 2 with p = 3/6
    ids = torch.tensor([[1, 2, 3]])
    lp = token_logprobs(logits, ids)
    assert lp[0, 0].item() == 0.0
    assert lp[0, 1].item() == pytest.approx(math.log(0.5))
    assert lp[0, 2].item() == pytest.approx(math.log(0.25))
    assert token_logprobs(logits, ids, temperature=2.0)[0, 1].item() == pytest.approx(
        math.log(math.sqrt(3) / (math.sqrt(3) + 3)))


def test_grpo_loss_combines_terms() -> None:
    batch = collate([[1, 2]], [[3, 4]], pad_id=0).with_(advantages=torch.tensor([2.0]))
    logp = torch.tensor([[0.0, 0.0, -1.0, -2.0]])
    ref = torch.tensor([[0.0, 0.0, -1.0, -1.0]])
    loss_fn = GRPOLoss(kl_coef=0.5, kl_estimator="k1")
    loss, metrics = loss_fn(logp, None, batch.with_(ref_logprobs=ref), num_tokens=2, num_seqs=1)
    # on-policy: ratio 1 -> pg = -A = -2 per token; k1 KL = [0, -1] -> mean -0.5; loss = -2 + 0.5 * -0.5
    assert loss.item() == pytest.approx(-2.25)
    assert metrics["actor/kl"].item() == pytest.approx(-0.5)
    assert metrics["actor/logprob_mean"].item() == pytest.approx(-1.5)


def test_batch_select_trims_padding() -> None:
    batch = collate([[1, 2], [5]], [[3, 4, 9], [6]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 9], [5, 6, 0, 0, 0]]
    assert batch.response_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    second = batch.select(slice(1, 2))
    assert isinstance(second, TokenBatch) and second.input_ids.tolist() == [[5, 6]]


def test_lr_schedule() -> None:
    assert [lr_factor(s, 2, 10, "constant", 0.0) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 2, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(6, 2, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(10, 2, 10, "cosine", 0.1) == pytest.approx(0.1)


# --- verl as an oracle -------------------------------------------------------------------------------------------

def test_matches_verl_grpo_advantage() -> None:
    core = pytest.importorskip("verl.trainer.ppo.core_algos")
    import numpy as np

    # 0/1 rewards only: there verl is right. On equal groups of non-dyadic rewards (0.1, 1/3) verl's float32
    # mean/std noise gives small one-signed advantages where ours are exactly 0 (see group_advantages).
    torch.manual_seed(0)
    rewards = torch.randint(0, 2, (6, 4)).float()
    rewards[0] = 1.0  # one all-equal group
    mask = torch.ones(24, 5)
    token_rewards = torch.zeros(24, 5)
    token_rewards[:, -1] = rewards.flatten()
    index = np.array([i // 4 for i in range(24)])
    for norm, scale in ((True, "group"), (False, "none")):
        verl_adv, _ = core.compute_grpo_outcome_advantage(token_rewards, mask, index, epsilon=1e-6,
                                                          norm_adv_by_std_in_grpo=norm)
        ours = group_advantages(rewards, scale).flatten()
        assert torch.allclose(verl_adv[:, 0], ours, atol=1e-5), scale


def test_matches_verl_kl_and_policy_loss() -> None:
    core = pytest.importorskip("verl.trainer.ppo.core_algos")
    torch.manual_seed(1)
    logp, ref = -torch.rand(3, 6), -torch.rand(3, 6)
    assert torch.allclose(core.kl_penalty(logp, ref, "low_var_kl"), kl_estimate(logp, ref, "k3"), atol=1e-6)
    assert torch.allclose(core.kl_penalty(logp, ref, "kl"), kl_estimate(logp, ref, "k1"))
    assert torch.allclose(core.kl_penalty(logp, ref, "mse"), kl_estimate(logp, ref, "k2"))

    old = logp + 0.3 * torch.randn(3, 6)
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.ones(3, 6)
    mask[1, 4:] = 0
    ours_tok, _ = clipped_policy_loss(logp, old, adv, 0.2, 0.28)
    ours = aggregate(ours_tok, mask, "token-mean", float(mask.sum()), 3.0)
    verl_adv = adv.unsqueeze(-1).expand(3, 6)
    if hasattr(core, "compute_policy_loss"):  # verl 0.4: the vanilla loss as a plain function
        result = core.compute_policy_loss(old, logp, verl_adv, mask, cliprange=0.2, cliprange_low=0.2,
                                          cliprange_high=0.28, clip_ratio_c=1e9, loss_agg_mode="token-mean")
    else:  # newer verl: the registry, configured by its actor config
        from omegaconf import OmegaConf
        config = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
                                   "clip_ratio_c": 1e9, "loss_agg_mode": "token-mean",
                                   "global_batch_info": {}, "tis_imp_ratio_cap": -1})
        result = core.get_policy_loss_fn("vanilla")(old, logp, verl_adv, mask, "token-mean", config)
    verl_loss = result[0] if isinstance(result, tuple) else result
    assert verl_loss.item() == pytest.approx(ours.item(), abs=1e-5)
