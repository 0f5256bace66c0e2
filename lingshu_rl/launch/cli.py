"""The launcher: one command from config to a trained, evaluated policy.

    python -m lingshu_rl.launch --reward mcq_exact                       # the embedded demo (no downloads)
    python -m lingshu_rl.launch --config recipe.yaml                     # sft stages -> grpo -> eval
    python -m lingshu_rl.launch --config recipe.yaml --stages grpo,eval --output-dir runs/a
    python -m lingshu_rl.launch --output-dir runs/a --resume auto        # continue after a crash or Ctrl-C
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from lingshu_rl.config import ConfigError, RunConfig, load_config, to_dict
from lingshu_rl.data import builtin
from lingshu_rl.data.readers import DataError, read_samples
from lingshu_rl.data.sample import Sample
from lingshu_rl.models.builtin import model_path
from lingshu_rl.rewards.combine import build_reward, specs_from_config
from lingshu_rl.rewards.registry import RewardResolutionError
from lingshu_rl.telemetry import redact
from lingshu_rl.telemetry.jsonl import read_jsonl

if TYPE_CHECKING:
    from lingshu_rl.launch.pipeline import Run

# torch, transformers and the GRPO modules are imported inside prepare() and main(), after the arguments and the
# config have been checked: --help and a mistyped key answer in a second, not after five seconds of imports
PRESETS = Path(__file__).parent / "presets"
DEMO_PRESET = PRESETS / "demo.yaml"
STAGES = ("sft", "grpo", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lingshu_rl.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="YAML recipe (default: the embedded demo preset)")
    source.add_argument("--preset", help="a built-in recipe: "
                        + ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
                        + " (demo-vl: the multimodal demo)")
    parser.add_argument("--reward", action="append", default=[],
                        help="reward: built-in name, entry point, pkg.module:fn or file.py:fn; combine with "
                             "'0.5*format+1.0*mcq_exact' or by repeating the flag (NAME=WEIGHT)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set grpo.steps=20 --set rollout.n=4")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of sft,grpo,eval")
    parser.add_argument("--output-dir", type=Path, help="run directory (default: runs/<timestamp>)")
    parser.add_argument("--resume", default=None, help="'auto' (newest checkpoints in the output dir) or a GRPO "
                                                       "checkpoint path")
    parser.add_argument("--ray-address", help="join an existing Ray cluster instead of starting one")
    return parser


def resolve_output_dir(requested: Path | None, resume: str | None) -> Path:
    if requested is not None:
        return requested
    runs = Path("runs")
    if resume == "auto" and runs.is_dir():
        candidates = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if candidates:
            return candidates[-1]
    return runs / time.strftime("%Y%m%d-%H%M%S")


def grpo_samples(cfg: RunConfig) -> list[Sample]:
    if cfg.data.train in builtin.DATA:
        return builtin.builtin_train_split(cfg.data.train, cfg.seed)
    return read_samples(cfg.data.train, cfg.data.skip_missing_images)


def base_model_path(cfg: RunConfig) -> str:
    return model_path(cfg.model.path, cfg.seed)


def summarise(output_dir: Path) -> None:
    metrics = output_dir / "metrics.jsonl"
    rows = [r for r in read_jsonl(metrics) if r.get("reward/mean") is not None] if metrics.is_file() else []
    if len(rows) >= 2:
        k = min(10, len(rows) // 2)
        first = sum(r["reward/mean"] for r in rows[:k]) / k
        last = sum(r["reward/mean"] for r in rows[-k:]) / k
        print(f"[lingshu] mean reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f} ({last - first:+.3f})")
    print(f"[lingshu] outputs: {output_dir}")


def preset_path(name: str | None) -> Path:
    if name is None:
        return DEMO_PRESET
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise ConfigError(f"unknown preset {name!r}; presets: {presets}")
    return path


def prepare(args: argparse.Namespace) -> Run:
    """Everything that can fail on bad input, checked before any cluster starts."""
    cfg = load_config(args.config or preset_path(args.preset), args.set)
    if args.reward:
        cfg.reward.rewards = list(args.reward)
    if args.ray_address:
        cfg.cluster.address = args.ray_address
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"--stages {args.stages!r}: choose from {', '.join(STAGES)}")
    specs = specs_from_config(cfg.reward.rewards)
    reward = build_reward(specs)
    from lingshu_rl.grpo.checkpoint import latest_checkpoint  # the arguments hold up: the heavy imports now
    from lingshu_rl.grpo.controller import find_resume
    from lingshu_rl.launch.pipeline import Run

    output_dir = resolve_output_dir(args.output_dir or (Path(cfg.output_dir) if cfg.output_dir else None), args.resume)
    if args.resume is None and "grpo" in stages and latest_checkpoint(output_dir) is not None:
        raise ConfigError(f"{output_dir} already holds GRPO checkpoints: pass --resume auto to continue, "
                          "or use a new --output-dir")
    cfg = dataclasses.replace(cfg, output_dir=str(output_dir))
    return Run(cfg, output_dir, stages, find_resume(output_dir, args.resume) if "grpo" in stages else None,
               args.resume is not None, reward, [s.name for s in specs],
               grpo_samples(cfg) if "grpo" in stages and cfg.grpo.steps else [], base_model_path(cfg))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run = prepare(args)
    except (ConfigError, RewardResolutionError, DataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run.output_dir.mkdir(parents=True, exist_ok=True)
    print(f"[lingshu] output directory: {run.output_dir.resolve()}", flush=True)
    (run.output_dir / "config.yaml").write_text(yaml.safe_dump(redact(to_dict(run.cfg)), sort_keys=False))

    import ray

    from lingshu_rl.data.chat import PromptTooLong
    from lingshu_rl.data.vision import ImageError
    from lingshu_rl.grpo.controller import TrainingStopped, WorkerDied
    from lingshu_rl.grpo.placement import PlacementError, check_fits, layout
    from lingshu_rl.launch.pipeline import StageMissing, run_pipeline
    from lingshu_rl.launch.ray_cluster import start_ray
    from lingshu_rl.launch.storage import StorageNotShared, check_shared_storage

    info = start_ray(run.cfg.cluster, namespace=f"lingshu-{run.output_dir.resolve().name}")
    if info["dashboard_url"]:
        print(f"[lingshu] Ray dashboard: http://{info['dashboard_url']}", flush=True)
    code = 0
    try:
        check_shared_storage(run.output_dir)  # several nodes: all of them must see the output directory
        if "grpo" in run.stages and run.cfg.grpo.steps:  # before any stage starts an actor
            check_fits(layout(run.cfg, with_ref=run.cfg.grpo.kl_coef > 0))
        run_pipeline(run)
    except (PromptTooLong, StageMissing, FileExistsError, DataError, ImageError, PlacementError,
            StorageNotShared) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except (WorkerDied, TrainingStopped) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    finally:
        ray.shutdown()
    summarise(run.output_dir)
    return code
