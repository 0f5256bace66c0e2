"""The GRPO controller: one loop on the driver that reads like the algorithm; workers hide the distribution.

    for each step:
        prompts  <- next batch                         (resumable sampler)
        rollouts <- rollout workers generate n each    (gen)
        rewards  <- scoring pool                       (score: parallel, timeouts, failures isolated)
        advantages <- group-normalised rewards
        ref log-probs <- reference worker              (ref: only when kl_coef > 0)
        actor update: PPO-clip + KL, micro-batched      (update)
        new weights -> rollout workers, canary checked  (sync)
        metrics; checkpoint every k steps
"""

from __future__ import annotations

import signal
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lingshu_rl.config import RunConfig
from lingshu_rl.data.sample import Sample
from lingshu_rl.data.sampler import EpochSampler
from lingshu_rl.data.vision import VisionInputs, vision_inputs
from lingshu_rl.grpo.algorithm import group_advantages, informative_groups
from lingshu_rl.grpo.checkpoint import latest_checkpoint, load_checkpoint_state, save_checkpoint
from lingshu_rl.grpo.failures import WorkerDied, describe_death
from lingshu_rl.grpo.failures import get_or_die as _get
from lingshu_rl.grpo.loss import GRPOLoss
from lingshu_rl.grpo.placement import ACTOR, REF, ROLLOUT, Roles, create_roles
from lingshu_rl.grpo.sync import WeightsOutOfSync, WeightSync
from lingshu_rl.rewards.base import RewardFn
from lingshu_rl.rewards.pool import ScoreItem, Scorer
from lingshu_rl.rollout.protocol import Generation, SamplingParams
from lingshu_rl.telemetry import PhaseTimer, Progress, Telemetry
from lingshu_rl.train.batch import collate, response_values

ACCURACY_REWARDS = ("mcq_exact", "answer_norm")


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. non-finite losses several steps in a row)."""


@dataclass
class Prompt:
    sample: Sample
    ids: list[int]  # chat-templated prompt tokens (image pads expanded)
    image_processor: Any = None  # for a sample with images: prepared in a Ray task when the prompt is drawn


@ray.remote(num_cpus=0, max_retries=0)
def _prepare_vision(image_processor: Any, sample: Sample) -> VisionInputs | None:
    return vision_inputs(image_processor, sample)


def _shares(count: int, workers: int) -> list[slice]:
    """How :func:`generate` splits ``count`` prompts between the rollout workers."""
    size = -(-count // workers)
    return [slice(i * size, (i + 1) * size) for i in range(workers)]


def prepare_visions(prompts: list[Prompt], roles: Roles) -> list[ray.ObjectRef | None]:
    """Each prompt's images, decoded and preprocessed once per prompt in a Ray task on the node of the rollout
    worker that will generate for it; the pixels stay in Ray's object store, where that worker and the training
    ranks fetch their own rows' (the driver never holds them: a data set's pixels need not fit anywhere)."""
    nodes = {p.name: p.node_id for p in roles.placed}
    out: list[ray.ObjectRef | None] = [None] * len(prompts)
    for i, part in enumerate(_shares(len(prompts), len(roles.rollouts))):
        node = nodes.get(ROLLOUT.format(i))
        task = _prepare_vision.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)) \
            if node else _prepare_vision
        for j in range(len(prompts))[part]:
            if prompts[j].sample.images:
                out[j] = task.remote(prompts[j].image_processor, prompts[j].sample)
    return out


def generate(roles: Roles, prompts: list[list[int]], params: SamplingParams,
             visions: list[ray.ObjectRef | None]) -> list[Generation]:
    """Split the prompts (and their images) across the rollout workers (data parallel); results stay grouped
    by prompt."""
    parts = _shares(len(prompts), len(roles.rollouts))
    refs = [(i, w.generate.remote(prompts[part], params, _images(visions[part])))
            for i, (w, part) in enumerate(zip(roles.rollouts, parts)) if prompts[part]]
    return [g for i, ref in refs for g in _get(ref, ROLLOUT.format(i))]


def _images(visions: list[ray.ObjectRef | None]) -> list[ray.ObjectRef | None] | None:
    return visions if any(v is not None for v in visions) else None


def accuracy_of(details: list[dict[str, float]], scores: list[float], reward_names: list[str]) -> float | None:
    """Mean accuracy: the score of a lone accuracy reward, or that reward's sub-score in a combination."""
    if len(reward_names) == 1 and reward_names[0] in ACCURACY_REWARDS:
        return sum(scores) / len(scores)
    for name in reward_names:
        if name in ACCURACY_REWARDS:
            return sum(d.get(name, 0.0) for d in details) / len(details)
    return None


def grpo_step(step: int, prompts: list[Prompt], roles: Roles, pool: Scorer, cfg: RunConfig, loss: GRPOLoss,
              reward_names: list[str], pad_id: int, timer: PhaseTimer, weights: WeightSync
              ) -> tuple[dict[str, float], list[dict]]:
    n = cfg.rollout.n
    params = SamplingParams(n=n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                            top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens,
                            stop=cfg.rollout.stop, seed=cfg.seed * 1_000_003 + step)
    with timer.phase("gen"):
        visions = prepare_visions(prompts, roles)
        gens = generate(roles, [p.ids for p in prompts], params, visions)  # [B*n], grouped by prompt
    with timer.phase("score"):
        owners = [p for p in prompts for _ in range(n)]
        scored = pool.score([ScoreItem(g.text, p.sample.answer, p.sample.reward_fields())
                             for g, p in zip(gens, owners)])
    rewards = torch.tensor(scored.scores, dtype=torch.float32).view(len(prompts), n)  # [B, n]
    keep = informative_groups(rewards) if cfg.grpo.dynamic_sampling else torch.ones(len(prompts), dtype=torch.bool)
    advantages = group_advantages(rewards, cfg.grpo.adv_scale)  # [B, n]
    rows = keep.repeat_interleave(n).nonzero().flatten().tolist()

    metrics = reward_metrics(scored.results, rewards, reward_names, gens)
    metrics.update(scored.stats())
    metrics["grpo/kept_groups"] = float(keep.sum())
    if rows:
        batch = collate([gens[i].prompt_ids for i in rows], [gens[i].response_ids for i in rows], pad_id)
        batch = batch.with_(advantages=advantages.flatten()[rows])
        if any(v is not None for v in visions):  # each training rank fetches its own rows' images
            batch = batch.with_(vision_refs=[visions[i // n] for i in rows])
        if cfg.grpo.mask_truncated:  # a cut-off response says nothing about how to end one: no gradient from it
            truncated = torch.tensor([gens[i].finish_reason == "length" for i in rows])
            batch = batch.with_(response_mask=batch.response_mask * (~truncated).float().unsqueeze(-1))
            metrics["grpo/masked_truncated"] = float(truncated.sum())
        if all(gens[i].logprobs is not None for i in rows):  # the rollout engine's own log-probs (vLLM)
            batch = batch.with_(rollout_logprobs=response_values(
                [len(gens[i].prompt_ids) for i in rows], [gens[i].logprobs for i in rows], batch.input_ids.shape[1]))
        elif loss.tis_cap:
            raise ValueError("rollout.tis_cap needs sampling log-probs, and this rollout engine returns none")
        if cfg.train.updates_per_step > 1:  # several updates: the ratio needs the pre-update log-probs
            with timer.phase("old"):
                batch = batch.with_(old_logprobs=_get(roles.actor.logprobs.remote(batch, loss.temperature), ACTOR))
        if roles.ref is not None:
            with timer.phase("ref"):
                batch = batch.with_(ref_logprobs=_get(roles.ref.logprobs.remote(batch, loss.temperature), REF))
        with timer.phase("update"):
            metrics.update(_get(roles.actor.update.remote(batch, loss), ACTOR))
        with timer.phase("sync"):
            metrics.update(weights.sync())
    samples = [{"step": step, "id": p.sample.id, "prompt": p.sample.messages[-1]["content"], "response": g.text,
                "answer": p.sample.answer, "reward": r.score, "finish_reason": g.finish_reason}
               for p, g, r in list(zip(owners, gens, scored.results))[::n][:cfg.logging.samples_per_step]]
    for failure in scored.failures[:3]:
        print(f"[lingshu] step {step}: reward failed on sample {failure.sample_id}: {failure.kind}: {failure.message}",
              flush=True)
    return metrics, samples


def reward_metrics(results: list, rewards: torch.Tensor, reward_names: list[str], gens: list[Generation]
                   ) -> dict[str, float]:
    scores = rewards.flatten().tolist()
    details = [r.details for r in results]
    metrics = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
               "grpo/zero_std_frac": float((~informative_groups(rewards)).float().mean())}
    accuracy = accuracy_of(details, scores, reward_names)
    if accuracy is not None:
        metrics["reward/accuracy"] = accuracy
    sums: dict[str, float] = defaultdict(float)
    for d in details:
        for key, value in d.items():
            sums[key] += value
    metrics.update({f"reward/{key}": value / len(details) for key, value in sums.items() if key != "failed"})
    lengths = torch.tensor([len(g.response_ids) for g in gens], dtype=torch.float32)
    metrics.update({"response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
                    "response/truncated_frac": sum(g.finish_reason == "length" for g in gens) / len(gens)})
    return metrics


class _StopFlag:
    """SIGINT/SIGTERM: finish the current step, checkpoint, exit. A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n[lingshu] {self.requested}: finishing this step, then writing a checkpoint and stopping "
              "(Ctrl-C again to abort now)", flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_grpo(cfg: RunConfig, output_dir: Path, prompts: list[Prompt], policy_path: str, pad_id: int,
               reward: RewardFn, reward_names: list[str], telemetry: Telemetry, resume: Path | None) -> Path | None:
    """Run (or resume) GRPO for ``cfg.grpo.steps`` steps, scoring with ``reward`` in the scoring actor (what the
    rewards print goes to ``reward_workers.log``); returns the last checkpoint written."""
    start_step, position, nan_streak = 0, 0, 0
    actor_path = policy_path
    if resume is not None:
        state = load_checkpoint_state(resume)
        start_step, position, nan_streak = state["step"], state["data_position"], state.get("nan_streak", 0)
        actor_path = str(resume / "model")
        print(f"[lingshu] resuming from {resume} (step {start_step})", flush=True)
    total_updates = cfg.grpo.steps * cfg.train.updates_per_step
    roles = create_roles(cfg, actor_path, policy_path if cfg.grpo.kl_coef > 0 else None, total_updates, reward,
                         (output_dir / "reward_workers.log").resolve())  # the actor may run elsewhere: no relative path
    pool = roles.reward
    assert pool is not None  # a reward was given
    last_ckpt = resume
    try:
        if resume is not None:
            _get(roles.actor.load_training_state.remote(str(resume)), ACTOR)
        sampler = EpochSampler(prompts, cfg.seed, cfg.data.shuffle, position)
        loss = GRPOLoss(cfg.grpo.clip_low, cfg.grpo.clip_high, cfg.grpo.kl_coef, cfg.grpo.kl_estimator,
                        cfg.grpo.loss_agg, cfg.grpo.entropy_coef, cfg.rollout.temperature, cfg.rollout.tis_cap)
        timer = PhaseTimer()
        weights = WeightSync(roles, cfg, actor_path)
        start = weights.check()  # the rollout workers loaded the actor's checkpoint themselves: check that too
        print(f"[lingshu] canary before the first step: mean |log-prob difference| "
              f"{start['sync/canary_abs_diff']:.2g}", flush=True)

        def checkpoint(step: int) -> Path:
            state = {"data_position": sampler.position, "nan_streak": nan_streak}
            return save_checkpoint(output_dir, step, lambda d: _get(roles.actor.save.remote(str(d)), ACTOR), state,
                                   cfg.checkpoint.keep)

        with _StopFlag() as stop, Progress(total=cfg.grpo.steps - start_step, desc="grpo") as bar:
            for step in range(start_step + 1, cfg.grpo.steps + 1):
                timer.reset()
                metrics, samples = grpo_step(step, sampler.next(cfg.grpo.prompts_per_step), roles, pool, cfg, loss,
                                             reward_names, pad_id, timer, weights)
                metrics.update(timer.metrics())
                nan_streak = nan_streak + 1 if metrics.get("actor/nan_skipped", 0) else 0
                telemetry.log_step(step, metrics)
                telemetry.log_samples(step, samples)
                bar.update(1, postfix=f"reward {metrics['reward/mean']:.3f}")
                if nan_streak >= cfg.grpo.max_nan_steps:
                    raise TrainingStopped(f"the loss was not finite for {nan_streak} steps in a row (updates skipped); "
                                          f"stopping. Last checkpoint: {last_ckpt or 'none'}")
                if step % cfg.checkpoint.every == 0 or step == cfg.grpo.steps or stop.requested:
                    last_ckpt = checkpoint(step)
                if stop.requested:
                    print(f"[lingshu] stopped by {stop.requested} after step {step}; checkpoint: {last_ckpt}",
                          flush=True)
                    break
    except WorkerDied as err:
        raise WorkerDied(f"{describe_death(err, roles.placed)}. Last checkpoint: {last_ckpt or 'none'} (resume with "
                         "--resume auto)", err.role, err.actor_id) from None
    except WeightsOutOfSync as err:
        raise TrainingStopped(f"{err}. Last checkpoint: {last_ckpt or 'none'}") from None
    finally:
        roles.shutdown()
    return last_ckpt


def find_resume(output_dir: Path, resume: str | None) -> Path | None:
    """``--resume auto``: the newest checkpoint under ``output_dir`` (None if there is none); a path: that one."""
    if not resume or resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no state.json)")
    return path
