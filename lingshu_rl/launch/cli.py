"""The launcher: one command from config to a trained policy.

    python -m lingshu_rl.launch --reward mcq_exact                       # the embedded demo (no downloads)
    python -m lingshu_rl.launch --config run.yaml --set grpo.kl_coef=0.01 --output-dir runs/a
    python -m lingshu_rl.launch --output-dir runs/a --resume auto        # continue after a crash or Ctrl-C
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import yaml

from lingshu_rl.config import ConfigError, RunConfig, load_config, to_dict
from lingshu_rl.data.chat import PromptTooLong, encode_prompt
from lingshu_rl.data.readers import DataError, read_samples
from lingshu_rl.data.sample import Sample
from lingshu_rl.grpo.controller import Prompt, TrainingStopped, WorkerDied, find_resume, train_grpo
from lingshu_rl.rewards.combine import build_reward, specs_from_config
from lingshu_rl.rewards.pool import RewardPool
from lingshu_rl.rewards.registry import RewardResolutionError
from lingshu_rl.telemetry import Telemetry, redact
from lingshu_rl.telemetry.jsonl import read_jsonl

DEMO_PRESET = Path(__file__).parent / "presets" / "demo.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lingshu_rl.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML run config (default: the embedded demo preset)")
    parser.add_argument("--reward", action="append", default=[],
                        help="reward: built-in name, entry point, pkg.module:fn or file.py:fn; combine with "
                             "'0.5*format+1.0*mcq_exact' or by repeating the flag (NAME=WEIGHT)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set grpo.steps=20 --set rollout.n=4")
    parser.add_argument("--output-dir", type=Path, help="run directory (default: runs/<timestamp>)")
    parser.add_argument("--resume", default=None, help="'auto' (newest checkpoint in the output dir) or a path")
    parser.add_argument("--ray-address", help="join an existing Ray cluster instead of starting one")
    return parser


def resolve_output_dir(requested: Path | None, resume: str | None) -> Path:
    if requested is not None:
        return requested
    runs = Path("runs")
    if resume == "auto" and runs.is_dir():
        candidates = sorted((p for p in runs.iterdir() if (p / "checkpoints").is_dir()), key=lambda p: p.stat().st_mtime)
        if candidates:
            return candidates[-1]
    return runs / time.strftime("%Y%m%d-%H%M%S")


def load_data(cfg: RunConfig) -> tuple[list[Sample], list[Sample]]:
    """(train samples, warm-up samples with an assistant target)."""
    if cfg.data.train == "demo":
        from lingshu_rl.data.demo import demo_sft_sample, make_demo_dataset

        train, _ = make_demo_dataset(seed=cfg.seed)
        return train, [demo_sft_sample(s) for s in train]
    train = read_samples(cfg.data.train)
    return train, [s for s in train if s.messages[-1]["role"] == "assistant"]


def model_path(cfg: RunConfig) -> str:
    if cfg.model.path == "tiny":
        from lingshu_rl.models.tiny import build_tiny_model

        return str(build_tiny_model(seed=cfg.seed))
    return cfg.model.path


def summarise(output_dir: Path) -> None:
    rows = [r for r in read_jsonl(output_dir / "metrics.jsonl") if r.get("reward/mean") is not None]
    if len(rows) >= 2:
        k = min(10, len(rows) // 2)
        first = sum(r["reward/mean"] for r in rows[:k]) / k
        last = sum(r["reward/mean"] for r in rows[-k:]) / k
        print(f"[lingshu] mean reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f} ({last - first:+.3f})")
    print(f"[lingshu] outputs: {output_dir} (metrics.jsonl, samples.jsonl, reward_curve.png, wandb/, checkpoints/)")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config or DEMO_PRESET, args.set)
        if args.reward:
            cfg.reward.rewards = list(args.reward)
        if args.ray_address:
            cfg.cluster.address = args.ray_address
        specs = specs_from_config(cfg.reward.rewards)
        reward = build_reward(specs)
    except (ConfigError, RewardResolutionError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    output_dir = resolve_output_dir(args.output_dir or (Path(cfg.output_dir) if cfg.output_dir else None), args.resume)
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, output_dir=str(output_dir))
    print(f"[lingshu] output directory: {output_dir.resolve()}", flush=True)
    try:
        resume = find_resume(output_dir, args.resume)
        train, sft = load_data(cfg)
        path = model_path(cfg)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        prompts = [Prompt(s, encode_prompt(tokenizer, s, cfg.data.max_prompt_tokens)) for s in train]
        if cfg.warmup.steps and not sft:
            raise ConfigError("warmup.steps > 0 but no training sample has a target (an assistant answer)")
    except (ConfigError, DataError, PromptTooLong, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    (output_dir / "config.yaml").write_text(yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False))
    return run(cfg, output_dir, resume, reward, [s.name for s in specs], prompts, sft, path, tokenizer)


def run(cfg: RunConfig, output_dir: Path, resume: Path | None, reward, reward_names: list[str], prompts: list[Prompt],
        sft: list[Sample], path: str, tokenizer) -> int:
    import ray

    from lingshu_rl.grpo.placement import start_ray
    from lingshu_rl.sft.warmup import sft_warmup

    info = start_ray(cfg.cluster, namespace=f"lingshu-{output_dir.resolve().name}")
    if info["dashboard_url"]:
        print(f"[lingshu] Ray dashboard: http://{info['dashboard_url']}", flush=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    telemetry = Telemetry(output_dir, redact(to_dict(cfg)), cfg.logging.wandb, cfg.logging.ray_metrics,
                          cfg.logging.console, resume_step=(int(resume.name.split("_")[-1]) if resume else None),
                          total_steps=cfg.grpo.steps)
    code = 0
    try:
        with RewardPool(reward, cfg.reward.workers, cfg.reward.timeout_s, cfg.reward.failure_score) as pool:
            policy = sft_warmup(cfg, sft, path, tokenizer, output_dir) if cfg.warmup.steps else path
            train_grpo(cfg, output_dir, prompts, policy, pad_id, pool, reward_names, telemetry, resume)
    except (WorkerDied, TrainingStopped) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    finally:
        telemetry.close()
        ray.shutdown()
    summarise(output_dir)
    return code
