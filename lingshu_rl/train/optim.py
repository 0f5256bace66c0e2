"""AdamW with linear warm-up then a constant or cosine learning rate."""

from __future__ import annotations

import fnmatch
import math

import torch

from lingshu_rl.config import TrainConfig


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_lr_groups(names: list[str], cfg: TrainConfig) -> None:
    """Every ``cfg.lr_groups`` glob must match one of the trainable parameters' ``names``."""
    unused = [g for g in cfg.lr_groups if not any(fnmatch.fnmatchcase(n, g) for n in names)]
    if unused:
        raise ValueError(f"train.lr_groups patterns match no trainable parameter: {unused} "
                         f"(names look like {names[0]!r})")


def param_groups(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig, lr: float) -> list[dict]:
    """One optimiser group per learning rate: the first ``cfg.lr_groups`` glob a name matches, else ``lr``."""
    by_lr: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in named:
        group_lr = next((v for g, v in cfg.lr_groups.items() if fnmatch.fnmatchcase(name, g)), lr)
        by_lr.setdefault(group_lr, []).append(param)
    return [{"params": params, "lr": group_lr} for group_lr, params in by_lr.items()]


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig, total_steps: int,
                   lr: float | None = None) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters ``named`` (per-glob learning rates) and its schedule; the caller checks
    the globs (:func:`check_lr_groups`) against all trainable names, of which ``named`` may be a share."""
    optimizer = torch.optim.AdamW(param_groups(named, cfg, lr or cfg.lr), betas=cfg.betas,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.schedule, cfg.min_lr_ratio))
    return optimizer, scheduler
