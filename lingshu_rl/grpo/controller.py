"""The GRPO controller: one loop on the driver that reads like the algorithm; workers hide the distribution.

    for each step:
        prompts  <- next batch                         (resumable sampler)
        rollouts <- rollout workers generate n each    (gen: dealt by load; each chunk scored as it arrives)
        rewards  <- scoring pool                       (score: parallel, timeouts, failures isolated)
        advantages <- group-normalised rewards
        ref log-probs <- reference worker              (ref: beside the scoring; only when kl_coef > 0)
        actor update: PPO-clip + KL, micro-batched      (update)
        new weights -> rollout workers, canary checked  (sync)
        metrics; checkpoint every k steps

With ``grpo.one_step_off`` the next step's rollouts generate while this step scores and updates (StepLoop).
"""

from __future__ import annotations

import signal
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from lingshu_rl.config import RunConfig
from lingshu_rl.data.sampler import EpochSampler
from lingshu_rl.grpo.algorithm import group_advantages, informative_groups
from lingshu_rl.grpo.checkpoint import latest_checkpoint, load_checkpoint_state, save_checkpoint
from lingshu_rl.grpo.failures import WorkerDied, describe_death
from lingshu_rl.grpo.failures import get_or_die as _get
from lingshu_rl.grpo.loss import GRPOLoss
from lingshu_rl.grpo.placement import ACTOR, REF, Roles, create_roles
from lingshu_rl.grpo.rollouts import Prompt, Rollouts, load_generations, save_generations, start_rollouts
from lingshu_rl.grpo.sync import WeightsOutOfSync, WeightSync
from lingshu_rl.rewards.base import RewardFn
from lingshu_rl.rewards.pool import ScoreItem
from lingshu_rl.rollout.protocol import Generation, SamplingParams
from lingshu_rl.telemetry import PhaseTimer, Progress, Telemetry
from lingshu_rl.train.batch import collate, response_values

ACCURACY_REWARDS = ("mcq_exact", "answer_norm")


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. non-finite losses several steps in a row)."""


def accuracy_of(details: list[dict[str, float]], scores: list[float], reward_names: list[str]) -> float | None:
    """Mean accuracy: the score of a lone accuracy reward, or that reward's sub-score in a combination."""
    if len(reward_names) == 1 and reward_names[0] in ACCURACY_REWARDS:
        return sum(scores) / len(scores)
    for name in reward_names:
        if name in ACCURACY_REWARDS:
            return sum(d.get(name, 0.0) for d in details) / len(details)
    return None


class StepLoop:
    """The GRPO steps in order. Serial: each step generates, then scores and updates. ``grpo.one_step_off``: the
    next step's rollouts generate (with the weights before this step's update) while this step scores, computes
    reference log-probs and updates; they are waited for before the weight sync, so the staleness is at most one
    step, and logged (``grpo/staleness``)."""

    def __init__(self, cfg: RunConfig, roles: Roles, sampler: EpochSampler, loss: GRPOLoss, reward_names: list[str],
                 pad_id: int, timer: PhaseTimer, weights: WeightSync, policy_version: int = 0):
        self.cfg, self.roles, self.sampler, self.loss = cfg, roles, sampler, loss
        self.reward_names, self.pad_id, self.timer, self.weights = reward_names, pad_id, timer, weights
        assert roles.reward is not None, "GRPO needs a reward"
        self.pool = roles.reward
        self.policy_version = policy_version  # steps whose update reached the rollout workers
        self.ahead: Rollouts | None = None  # one-step-off: the next step's rollouts, generating or made
        self._background = ThreadPoolExecutor(1, thread_name_prefix="rollouts")

    def params(self, step: int) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens, stop=r.stop,
                              seed=self.cfg.seed * 1_000_003 + step)

    def _draw(self, step: int, ready: list[Generation] | None = None, policy_version: int | None = None
              ) -> Rollouts:
        position = self.sampler.position
        prompts = self.sampler.next(self.cfg.grpo.prompts_per_step)
        version = self.policy_version if policy_version is None else policy_version
        return start_rollouts(step, prompts, self.roles, self.params(step), version, position, self._background,
                              self._submit_scores, ready)

    def _submit_scores(self, prompts: list[Prompt], gens: list[Generation]) -> Any:
        owners = [p.sample for p in prompts for _ in range(self.cfg.rollout.n)]
        return self.pool.submit([ScoreItem(g.text, s.answer, s.reward_fields()) for g, s in zip(gens, owners)])

    def resume_ahead(self, step: int, ready: list[Generation], policy_version: int) -> None:
        """The rollouts a checkpoint saved for ``step`` (made one step ahead, by the weights of
        ``policy_version``): the resumed run trains on exactly them."""
        self.ahead = self._draw(step, ready, policy_version)

    def run(self, step: int, last: int) -> tuple[dict[str, float], list[dict]]:
        with self.timer.phase("gen"):
            current = self.ahead or self._draw(step)
            gens = current.generations()  # [B*n], grouped by prompt
        self.ahead = self._draw(step + 1) if self.cfg.grpo.one_step_off and step < last else None
        metrics, samples, updated = self._learn(step, current, gens)
        metrics["grpo/staleness"] = float(self.policy_version - current.policy_version)
        if self.ahead is not None:
            with self.timer.phase("gen_wait"):  # the rollout workers finish the next step's rollouts first
                self.ahead.generations()
        if updated:
            with self.timer.phase("sync"):
                metrics.update(self.weights.sync())
            self.policy_version += 1
        return metrics, samples

    def data_position(self) -> int:
        """Where a resumed run's sampler starts: before the prompts of the rollouts made ahead, if any."""
        return self.ahead.data_position if self.ahead is not None else self.sampler.position

    def close(self) -> None:
        self._background.shutdown(wait=False, cancel_futures=True)

    def _learn(self, step: int, rollouts: Rollouts, gens: list[Generation]
               ) -> tuple[dict[str, float], list[dict], bool]:
        """Score, advantages, reference log-probs, the update. Returns metrics, logged samples, and whether the
        actor updated."""
        cfg, roles, loss, n = self.cfg, self.roles, self.loss, self.cfg.rollout.n
        prompts, visions = rollouts.prompts, rollouts.visions
        batch = collate([g.prompt_ids for g in gens], [g.response_ids for g in gens], self.pad_id)
        if any(v is not None for v in visions):  # each training rank fetches its own rows' images
            batch = batch.with_(vision_refs=[visions[i // n] for i in range(len(gens))])
        ref = None
        if roles.ref is not None and not cfg.grpo.dynamic_sampling:  # beside the scoring: it needs no rewards
            ref = roles.ref.logprobs.remote(batch, loss.temperature)
        with self.timer.phase("score"):  # each chunk went to scoring as soon as it was generated
            scored = self.pool.collect(rollouts.scores_submitted())
        rewards = torch.tensor(scored.scores, dtype=torch.float32).view(len(prompts), n)  # [B, n]
        keep = informative_groups(rewards) if cfg.grpo.dynamic_sampling \
            else torch.ones(len(prompts), dtype=torch.bool)
        advantages = group_advantages(rewards, cfg.grpo.adv_scale)  # [B, n]
        rows = keep.repeat_interleave(n).nonzero().flatten()

        metrics = reward_metrics(scored.results, rewards, self.reward_names, gens)
        metrics.update(scored.stats())
        metrics["grpo/kept_groups"] = float(keep.sum())
        if len(rows):
            batch = batch.with_(advantages=advantages.flatten())
            if cfg.grpo.mask_truncated:  # a cut-off response says nothing about how to end one: no gradient from it
                truncated = torch.tensor([g.finish_reason == "length" for g in gens])
                batch = batch.with_(response_mask=batch.response_mask * (~truncated).float().unsqueeze(-1))
                metrics["grpo/masked_truncated"] = float(truncated[rows].sum())
            if all(g.logprobs is not None for g in gens):  # the rollout engine's own log-probs (vLLM)
                batch = batch.with_(rollout_logprobs=response_values(
                    [len(g.prompt_ids) for g in gens], [g.logprobs or [] for g in gens], batch.input_ids.shape[1]))
            elif loss.tis_cap or cfg.grpo.one_step_off:
                raise ValueError("rollout.tis_cap and grpo.one_step_off need sampling log-probs, and this rollout "
                                 "engine returns none")
            if len(rows) < len(gens):  # dynamic sampling dropped groups (the reference pass waited for it)
                batch = batch.select(rows)
            if cfg.grpo.one_step_off and not loss.tis_cap:  # the ratio against the policy that sampled them
                batch = batch.with_(old_logprobs=batch.rollout_logprobs)
            elif cfg.train.updates_per_step > 1:  # several updates: the ratio needs the pre-update log-probs
                with self.timer.phase("old"):
                    batch = batch.with_(old_logprobs=_get(roles.actor.logprobs.remote(batch, loss.temperature),
                                                          ACTOR))
            if roles.ref is not None:
                with self.timer.phase("ref"):
                    if ref is None:  # not started beside the scoring (dynamic sampling)
                        ref = roles.ref.logprobs.remote(batch, loss.temperature)
                    batch = batch.with_(ref_logprobs=_get(ref, REF))
            with self.timer.phase("update"):
                metrics.update(_get(roles.actor.update.remote(batch, loss), ACTOR))
        samples = [{"step": step, "id": p.sample.id, "prompt": p.sample.messages[-1]["content"], "response": g.text,
                    "answer": p.sample.answer, "reward": r.score, "finish_reason": g.finish_reason}
                   for p, g, r in list(zip(prompts, gens[::n], scored.results[::n]))[:cfg.logging.samples_per_step]]
        for failure in scored.failures[:3]:
            print(f"[lingshu] step {step}: reward failed on sample {failure.sample_id}: {failure.kind}: "
                  f"{failure.message}", flush=True)
        return metrics, samples, bool(len(rows))


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
    metrics.update({"response/length_mean": float(lengths.mean()), "response/length_min": float(lengths.min()),
                    "response/length_max": float(lengths.max()),
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
    start_step, position, nan_streak, policy_version = 0, 0, 0, 0
    actor_path = policy_path
    if resume is not None:
        state = load_checkpoint_state(resume)
        start_step, position, nan_streak = state["step"], state["data_position"], state.get("nan_streak", 0)
        policy_version = state.get("policy_version", start_step)
        actor_path = str(resume / "model")
        print(f"[lingshu] resuming from {resume} (step {start_step})", flush=True)
    total_updates = cfg.grpo.steps * cfg.train.updates_per_step
    roles = create_roles(cfg, actor_path, policy_path if cfg.grpo.kl_coef > 0 else None, total_updates, reward,
                         (output_dir / "reward_workers.log").resolve())  # the actor may run elsewhere: no relative path
    assert roles.reward is not None  # a reward was given
    last_ckpt = resume
    loop: StepLoop | None = None
    try:
        if resume is not None:
            _get(roles.actor.load_training_state.remote(str(resume)), ACTOR)
        loss = GRPOLoss(cfg.grpo.clip_low, cfg.grpo.clip_high, cfg.grpo.kl_coef, cfg.grpo.kl_estimator,
                        cfg.grpo.loss_agg, cfg.grpo.entropy_coef, cfg.rollout.temperature, cfg.rollout.tis_cap)
        timer = PhaseTimer()
        weights = WeightSync(roles, cfg, actor_path)
        start = weights.check()  # the rollout workers loaded the actor's checkpoint themselves: check that too
        print(f"[lingshu] canary before the first step: mean |log-prob difference| "
              f"{start['sync/canary_abs_diff']:.2g}", flush=True)
        loop = StepLoop(cfg, roles, EpochSampler(prompts, cfg.seed, cfg.data.shuffle, position), loss, reward_names,
                        pad_id, timer, weights, policy_version)
        saved = load_generations(resume) if resume is not None else None
        if saved is not None:  # one-step-off: the rollouts made ahead, trained on as the killed run would have
            loop.resume_ahead(saved[0]["step"], saved[1], saved[0]["policy_version"])

        def checkpoint(step: int) -> Path:
            assert loop is not None
            state = {"data_position": loop.data_position(), "nan_streak": nan_streak,
                     "policy_version": loop.policy_version}

            def write(directory: Path) -> None:
                _get(roles.actor.save.remote(str(directory)), ACTOR)
                if loop.ahead is not None:
                    save_generations(directory, loop.ahead)

            return save_checkpoint(output_dir, step, write, state, cfg.checkpoint.keep)

        with _StopFlag() as stop, Progress(total=cfg.grpo.steps - start_step, desc="grpo") as bar:
            for step in range(start_step + 1, cfg.grpo.steps + 1):
                timer.reset()
                metrics, samples = loop.run(step, cfg.grpo.steps)
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
        if loop is not None:
            loop.close()
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
