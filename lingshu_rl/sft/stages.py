"""Staged SFT: each stage trains on its data mix with its own frozen modules and learning rates, starting from
the previous stage's model, on the same training engine GRPO uses.

A stage writes ``OUTPUT_DIR/sft/<name>/``: ``model/`` (Hugging Face, safetensors), ``metrics.jsonl``,
``checkpoints/`` (every ``checkpoint_every`` steps) and ``done.json`` when finished. A finished stage is never
rerun; an interrupted one resumes at its newest checkpoint (``--resume auto``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import ray
from transformers import AutoTokenizer

from lingshu_rl.config import RunConfig, SFTStageConfig
from lingshu_rl.data.readers import DataError
from lingshu_rl.data.vision import VisionInputs, encode_conversation_with_images, load_image_processor, vision_inputs
from lingshu_rl.grpo.checkpoint import latest_checkpoint, load_checkpoint_state, save_checkpoint
from lingshu_rl.grpo.placement import start_policy_worker
from lingshu_rl.sft.data import plan_steps, read_source
from lingshu_rl.telemetry import Progress
from lingshu_rl.telemetry.jsonl import JsonlWriter
from lingshu_rl.train.batch import TokenBatch, collate_masked, pack, with_vision
from lingshu_rl.train.losses import SFTLoss


def stage_dir(output_dir: Path, stage: SFTStageConfig) -> Path:
    return Path(output_dir) / "sft" / stage.name


def stage_output(output_dir: Path, stage: SFTStageConfig) -> Path | None:
    """The finished stage's model directory, or None if the stage has not finished."""
    folder = stage_dir(output_dir, stage)
    return folder / "model" if (folder / "done.json").is_file() else None


def run_sft(cfg: RunConfig, base_model: str, output_dir: Path, resume: bool) -> str:
    """Run every configured stage in order; return the last stage's model directory."""
    model = base_model
    for stage in cfg.sft.stages:
        model = run_stage(cfg, stage, model, output_dir, resume)
    return model


Encoded = tuple[list[int], list[int], VisionInputs | None]  # ids, loss mask, images


def _batch(rows: list[Encoded], stage: SFTStageConfig, pad_id: int) -> TokenBatch:
    tokens = [(ids, mask) for ids, mask, _ in rows]
    visions = [vision for _, _, vision in rows]
    if stage.packing:
        return pack(tokens, stage.max_length, pad_id, visions)
    return with_vision(collate_masked(tokens, pad_id), visions)


def run_stage(cfg: RunConfig, stage: SFTStageConfig, input_model: str, output_dir: Path, resume: bool) -> str:
    folder = stage_dir(output_dir, stage)
    if (done := stage_output(output_dir, stage)) is not None:
        print(f"[lingshu] sft stage {stage.name!r} already finished: {done}", flush=True)
        return str(done)
    checkpoint = latest_checkpoint(folder)
    if checkpoint is not None and not resume:
        raise FileExistsError(f"sft stage {stage.name!r} has checkpoints in {folder}: pass --resume auto to continue "
                              "it, or use a new --output-dir")
    tokenizer = AutoTokenizer.from_pretrained(input_model, trust_remote_code=cfg.model.trust_remote_code)
    if stage.chat_template:
        tokenizer.chat_template = Path(stage.chat_template).read_text()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    image_processor = load_image_processor(input_model, cfg.model.trust_remote_code)  # None: a text-only model
    sources = [read_source(source, cfg.seed) for source in stage.data]
    plan = plan_steps(stage, sources, cfg.seed)
    # token ids by sample object (ids may repeat across sources); pixels are not kept: a step prepares the
    # images of the samples it draws, so a data set's pixels need not fit in memory
    encoded: dict[int, tuple[list[int], list[int]]] = {}

    def rows(samples: list) -> list[Encoded]:
        out = []
        for s in samples:
            if s.images and image_processor is None:
                raise DataError(f"sample {s.id!r} has images but the model {input_model} has no vision tower")
            if id(s) in encoded:
                out.append((*encoded[id(s)], vision_inputs(image_processor, s)))
            else:
                ids, mask, vision = encode_conversation_with_images(tokenizer, image_processor, s, stage.max_length)
                encoded[id(s)] = (ids, mask)
                out.append((ids, mask, vision))
        return out

    train_cfg = dataclasses.replace(cfg.train, lr=stage.lr, lr_groups=stage.lr_groups, freeze=stage.freeze,
                                    schedule=stage.schedule, warmup_steps=stage.warmup_steps,
                                    weight_decay=stage.weight_decay, updates_per_step=1)
    start, model_path = 0, input_model
    if checkpoint is not None:
        start = load_checkpoint_state(checkpoint)["step"]
        model_path = str(checkpoint / "model")
        print(f"[lingshu] resuming sft stage {stage.name!r} at step {start} from {checkpoint}", flush=True)
    placed = start_policy_worker(cfg, model_path, train_cfg, len(plan), True, f"lingshu/sft-{stage.name}")
    worker = placed.handle
    log = JsonlWriter(folder / "metrics.jsonl", keep_through_step=start)
    metrics: dict[str, float] = {}
    try:
        if checkpoint is not None:
            ray.get(worker.load_training_state.remote(str(checkpoint)))
        with Progress(total=len(plan) - start, desc=f"sft:{stage.name}") as bar:
            for step in range(start + 1, len(plan) + 1):
                metrics = ray.get(worker.update.remote(_batch(rows(plan[step - 1]), stage, pad_id), SFTLoss()))
                log.write({"step": step, **metrics})
                bar.update(1, postfix=f"loss {metrics['sft/loss']:.3f}")
                if step % stage.checkpoint_every == 0 and step < len(plan):
                    save_checkpoint(folder, step, lambda d: ray.get(worker.save.remote(str(d))), {}, keep=1)
        tmp = folder / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        ray.get(worker.save.remote(str(tmp)))
        tokenizer.save_pretrained(tmp / "model")  # carries a stage's chat template forward
        shutil.rmtree(folder / "model", ignore_errors=True)
        os.replace(tmp / "model", folder / "model")
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        log.close()
        placed.shutdown()  # a PolicyWorker or a group's ranks, then its placement groups
    (folder / "done.json").write_text(json.dumps({"steps": len(plan), "final_loss": metrics.get("sft/loss")}))
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    print(f"[lingshu] sft stage {stage.name!r}: {len(plan)} steps, final loss {metrics.get('sft/loss')} -> "
          f"{folder / 'model'}", flush=True)
    return str(folder / "model")
