"""The recipe as one pipeline: staged SFT -> GRPO -> evaluation, each stage starting from the last one's model.

Every stage writes under the run's output directory and can be run on its own (``--stages``); a stage that
is skipped takes its input from what an earlier run of the same output directory left there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from transformers import AutoTokenizer

from lingshu_rl.config import RunConfig, to_dict
from lingshu_rl.data.readers import DataError
from lingshu_rl.data.sample import Sample
from lingshu_rl.data.vision import encode_prompt_with_images, load_image_processor
from lingshu_rl.grpo.checkpoint import latest_checkpoint
from lingshu_rl.grpo.controller import train_grpo
from lingshu_rl.grpo.rollouts import Prompt
from lingshu_rl.rewards.base import RewardFn
from lingshu_rl.sft.stages import run_sft, stage_output
from lingshu_rl.telemetry import Telemetry, redact


class StageMissing(RuntimeError):
    """A stage needs the output of an earlier stage that has not run in this output directory."""


@dataclass
class Run:
    cfg: RunConfig
    output_dir: Path
    stages: list[str]
    resume: Path | None  # the GRPO checkpoint to continue from
    resume_requested: bool
    reward: RewardFn
    reward_names: list[str]
    train_samples: list[Sample]  # GRPO prompts
    base_model: str


def sft_stage(run: Run) -> str | None:
    """The model after SFT (running the stages if asked), or None when the recipe has no SFT stages."""
    stages = run.cfg.sft.stages
    if not stages:
        return None
    if "sft" in run.stages:
        return run_sft(run.cfg, run.base_model, run.output_dir, run.resume_requested)
    done = stage_output(run.output_dir, stages[-1])
    if done is None and "grpo" in run.stages:
        raise StageMissing(f"GRPO starts from the SFT output, but the sft stage {stages[-1].name!r} has not finished "
                           f"in {run.output_dir}; run --stages sft first (or include it)")
    return str(done) if done else None


def grpo_stage(run: Run, policy: str) -> str | None:
    """The model after GRPO (training if asked), or None when the recipe has no GRPO steps."""
    cfg = run.cfg
    if cfg.grpo.steps == 0:
        return None
    if "grpo" not in run.stages:  # evaluate what an earlier run left, if anything
        last = latest_checkpoint(run.output_dir)
        return str(last / "model") if last else None
    tokenizer = AutoTokenizer.from_pretrained(policy, trust_remote_code=cfg.model.trust_remote_code)
    image_processor = load_image_processor(policy, cfg.model.trust_remote_code)  # None: a text-only model
    if image_processor is None and (with_images := [s.id for s in run.train_samples if s.images]):
        raise DataError(f"{len(with_images)} training sample(s) have images (first: {with_images[0]!r}) but the "
                        f"model {policy} has no vision tower")
    # every prompt is encoded up front (its length with image tokens is checked now); pixels are kept only
    # while their prompt is in use (Prompt.vision)
    prompts = [Prompt(s, encode_prompt_with_images(tokenizer, image_processor, s, cfg.data.max_prompt_tokens)[0],
                      image_processor if s.images else None) for s in run.train_samples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    resume_step = int(run.resume.name.split("_")[-1]) if run.resume else None
    telemetry = Telemetry(run.output_dir, redact(to_dict(cfg)), cfg.logging.wandb, cfg.logging.ray_metrics,
                          cfg.logging.console, resume_step=resume_step, total_steps=cfg.grpo.steps,
                          redact_text=cfg.logging.redact_text)
    try:
        last = train_grpo(cfg, run.output_dir, prompts, policy, pad_id, run.reward, run.reward_names, telemetry,
                          run.resume)
    finally:
        telemetry.close()
    return str(last / "model") if last else None


def _evaluate_in_worker(threads: int, *args: Any, **kwargs: Any) -> None:
    import torch

    from lingshu_rl.eval import evaluate

    torch.set_num_threads(threads)  # Ray gives a worker one thread; evaluation has the node to itself
    evaluate(*args, **kwargs)


def eval_stage(run: Run, models: dict[str, str]) -> None:
    """Evaluate the final model (and, with ``eval.compare``, every earlier one) on the configured benchmarks.

    Each evaluation runs in a Ray worker placed like a rollout worker (a sliver of a CPU and of each of the
    rollout's node labels, its GPUs), never in the driver: on a cluster the driver's node may hold nothing."""
    from lingshu_rl.eval import compare

    cfg, c = run.cfg.eval, run.cfg.cluster
    task = ray.remote(_evaluate_in_worker).options(
        num_cpus=1e-3, num_gpus=c.rollout_gpus, resources={k: 1e-3 for k in c.rollout_resources}, max_retries=0)
    threads = int(c.num_cpus or os.cpu_count() or 1) if c.colocate else max(1, int(c.rollout_cpus))
    chosen = models if cfg.compare else dict([list(models.items())[-1]])
    results = {}
    for name, path in chosen.items():
        out = (run.output_dir / "eval" / name).resolve()  # the worker may run elsewhere: no relative path
        data_dir = Path(cfg.data_dir).resolve() if cfg.data_dir else None
        try:
            ray.get(task.remote(threads, path, cfg.benchmarks, data_dir, out, engine=cfg.engine, limit=cfg.limit,
                                max_new_tokens=cfg.max_new_tokens, redact_text=run.cfg.logging.redact_text))
        except ray.exceptions.RayTaskError as err:  # the evaluation's own error (bad data, a missing image)
            raise err.cause from None
        results[name] = out
    if len(results) > 1:
        print(f"[lingshu] comparison: {compare(results, run.output_dir / 'eval')}", flush=True)


def run_pipeline(run: Run) -> None:
    models = {"base": run.base_model}
    policy = run.base_model
    if (after_sft := sft_stage(run)) is not None:
        models["sft"] = policy = after_sft
    if (after_grpo := grpo_stage(run, policy)) is not None:
        models["grpo"] = after_grpo
    if "eval" in run.stages and run.cfg.eval.benchmarks:
        eval_stage(run, models)
