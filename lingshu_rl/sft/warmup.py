"""The supervised warm-up before GRPO: a short SFT pass on the train split's target answers.

It runs in a Ray actor on the same training engine as GRPO and writes a Hugging Face model to
``OUTPUT_DIR/warmup/model``; a resumed run finds it there and does not repeat it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import ray
from transformers import PreTrainedTokenizerBase

from lingshu_rl.config import RunConfig
from lingshu_rl.data.chat import encode_sft
from lingshu_rl.data.sample import Sample
from lingshu_rl.data.sampler import EpochSampler
from lingshu_rl.grpo.workers import PolicyWorker
from lingshu_rl.telemetry import Progress
from lingshu_rl.telemetry.jsonl import JsonlWriter
from lingshu_rl.train.batch import collate
from lingshu_rl.train.losses import SFTLoss


def warmup_model_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "warmup" / "model"


def sft_warmup(cfg: RunConfig, samples: list[Sample], model_path: str, tokenizer: PreTrainedTokenizerBase,
               output_dir: Path) -> str:
    """Train ``cfg.warmup.steps`` SFT steps from ``model_path``; return the warmed-up model directory."""
    final = warmup_model_dir(output_dir)
    if (final / "config.json").is_file():
        print(f"[lingshu] warm-up already done: {final}", flush=True)
        return str(final)
    encoded = [encode_sft(tokenizer, s) for s in samples]
    train_cfg = dataclasses.replace(cfg.train, lr=cfg.warmup.lr, warmup_steps=0, schedule="constant",
                                    updates_per_step=1)
    worker = ray.remote(PolicyWorker).options(name="lingshu/sft-0", num_cpus=0).remote(
        model_path, cfg.model, train_cfg, cfg.warmup.steps, True, cfg.seed, cfg.cluster.num_cpus or os.cpu_count() or 1)
    sampler = EpochSampler(encoded, cfg.seed + 1)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log = JsonlWriter(final.parent / "metrics.jsonl", keep_through_step=0)
    try:
        with Progress(total=cfg.warmup.steps, desc="warm-up (sft)") as bar:
            for step in range(1, cfg.warmup.steps + 1):
                batch = collate(*zip(*sampler.next(cfg.warmup.batch_size)), pad_id)
                metrics = ray.get(worker.update.remote(batch, SFTLoss()))
                log.write({"step": step, **metrics})
                bar.update(1, postfix=f"loss {metrics['sft/loss']:.3f}")
        tmp = final.parent / ".tmp-save"
        shutil.rmtree(tmp, ignore_errors=True)
        ray.get(worker.save.remote(str(tmp)))
        os.replace(tmp / "model", final)
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        log.close()
        ray.kill(worker)
    print(f"[lingshu] warm-up: {cfg.warmup.steps} steps, final loss {metrics['sft/loss']:.3f} -> {final}", flush=True)
    return str(final)
