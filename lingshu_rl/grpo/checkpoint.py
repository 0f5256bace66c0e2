"""Checkpoints: ``OUTPUT_DIR/checkpoints/step_000010/`` holding the policy as a Hugging Face model
(``model/``, safetensors), the engine's training state (torch engine: ``train_state/``, float32 weights and
optimiser state sharded by ``torch.distributed.checkpoint``, and ``scheduler.pt``; megatron: ``megatron/``),
``rng.pt`` and ``state.json`` (step, data position, ...). Written into a temporary directory and renamed, so a
checkpoint is complete or absent.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_PREFIX = "step_"


def checkpoints_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir: Path, step: int, write_model: Callable[[Path], None], state: dict[str, Any],
                    keep: int) -> Path:
    """Write a checkpoint for ``step``: ``write_model(dir)`` stores the policy and optimiser; we add RNG and state."""
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_model(tmp)
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    _fsync_tree(tmp)
    if final.exists():  # re-running a step after a resume: replace the old checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    """Restore the driver's RNG and return ``state.json``."""
    rng = torch.load(Path(path) / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    return json.loads((Path(path) / "state.json").read_text())


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
