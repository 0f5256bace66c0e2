"""The sizes of ``grpo_step.py`` (``--size``): model, batch, response lengths, steps; and the response-length
bookkeeping every row reports."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Size:
    """A benchmark size: the model, the batch, the response lengths and how long each row runs."""

    name: str
    shape: tuple[int, int, int, int, int, int] | None  # random_models.Shape (vocab 0: the tokenizer's); None: tiny
    prompts: int  # per step
    n: int  # samples per prompt
    max_new: int  # new tokens per response, at most
    min_new: int  # and at least (the end-of-turn token cannot be sampled before); 0: no minimum
    warmup: int  # steps per row before the measured ones (Ray's own start-up work goes on for some seconds)
    measured: int
    rounds: int  # default of --rounds


SIZES = {
    "tiny": Size("tiny", None, prompts=8, n=8, max_new=32, min_new=0, warmup=3, measured=8, rounds=2),
    # hidden, layers (as Qwen2.5-0.5B), query heads, key/value heads, MLP, vocabulary: 38.3M parameters, untied
    "small": Size("small", (384, 24, 6, 2, 1024, 0), prompts=2, n=8, max_new=128, min_new=128, warmup=2,
                  measured=5, rounds=1),
}


def build_model(size: Size, workdir: Path) -> str:
    """The size's model, built by the driver before the rows: the tiny demo model (cached), or a random Qwen2
    written under ``workdir`` (``torch.manual_seed(0)``: the same weights on every run)."""
    import random_models  # benchmarks/random_models.py (a script's folder is on sys.path)

    return random_models.build(size.name, size.shape, workdir)


def model_dir(size: Size, workdir: Path) -> str:
    """Where :func:`build_model` put the model (the tiny one is found again in its cache)."""
    from lingshu_rl.models.tiny import build_tiny_model

    return str(build_tiny_model()) if size.shape is None else str(workdir / size.name)


def describe_model(size: Size, path: str) -> str:
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:  # tied weights are saved once
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not a dict)
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    shape = "the tiny demo model" if size.shape is None else (
        "random-init Qwen2, hidden {}, {} layers, {} query and {} key/value heads, MLP {}, untied embeddings"
        .format(*size.shape[:5]))
    return f"{shape}, vocabulary {vocab}, {params / 1e6:.1f}M parameters"


# ---- response lengths: each row records {"mean", "min", "max", "responses"} over all its steps ------------------

def step_lengths(lengths: list[int]) -> tuple[float, int, int]:
    return statistics.mean(lengths), min(lengths), max(lengths)


def length_stats(per_step: list[tuple[float, int, int]], responses: int) -> dict[str, Any]:
    """A row's response lengths in tokens, warm-up steps included, from each step's (mean, min, max) (every step
    has the same number of responses), as the ``lengths`` entry of its result."""
    return {"lengths": {"mean": statistics.mean(m for m, _, _ in per_step), "min": min(lo for _, lo, _ in per_step),
                        "max": max(hi for _, _, hi in per_step), "responses": responses}}


def merge_lengths(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    responses = sum(r["responses"] for r in rounds)
    return {"mean": sum(r["mean"] * r["responses"] for r in rounds) / responses,
            "min": min(r["min"] for r in rounds), "max": max(r["max"] for r in rounds), "responses": responses}


def print_lengths(size: Size, rows: dict[str, dict[str, Any]]) -> None:
    """Each row's response lengths (``rows``: label -> lengths); a loud warning where the size fixes them and a
    row's differ."""
    if not rows:
        return
    print("\nResponse lengths, tokens (mean / min / max over every step's responses, warm-up included; "
          "floor-train: the sequences it trained on):")
    for name, n in rows.items():
        print(f"  {name:<46} {n['mean']:>7.2f} / {n['min']:>4.0f} / {n['max']:>4.0f}  ({n['responses']} responses)")
    off = [name for name, n in rows.items() if not n["min"] == n["max"] == size.max_new]
    if size.min_new == size.max_new and off:
        print(f"\n{'!' * 100}\nWARNING: responses were NOT all exactly {size.max_new} tokens in: {'; '.join(off)}. "
              f"These rows did different work from the others: their times are not comparable.\n{'!' * 100}")
