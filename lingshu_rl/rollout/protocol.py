"""What the rollout workers need from a generation engine."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from lingshu_rl.data.vision import VisionInputs


@dataclass
class SamplingParams:
    """Sampling settings; every engine gives them the same meaning."""

    n: int = 1  # responses per prompt
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 64
    min_new_tokens: int = 0  # end-of-turn tokens are not sampled before this many tokens
    stop: list[str] = field(default_factory=list)  # stop strings (the end-of-turn token always stops)
    seed: int = 0


@dataclass
class Generation:
    prompt_ids: list[int]
    response_ids: list[int]  # includes the end-of-turn token when the model produced one
    text: str  # decoded response without special tokens
    finish_reason: str  # "stop" | "length"
    logprobs: list[float] | None = None  # the engine's own sampling log-probs, where available


class RolloutEngine(Protocol):
    device: torch.device  # where the weights live (a weight sync's buffers go there)

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: list[VisionInputs | None] | None = None) -> list[Generation]:
        """``params.n`` generations per prompt, grouped: prompt 0's n responses first. ``images[i]`` are prompt
        i's images (its ids hold the expanded image pads, :mod:`lingshu_rl.data.vision`)."""

    def load_weights(self, weights: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> None:
        """Replace the model weights in place from Hugging Face-named tensors: a dict, or ``(name, tensor)`` pairs
        (a stream: each tensor is read once, when the loader reaches it)."""

    def score(self, prompt: list[int], response: list[int], vision: VisionInputs | None = None) -> list[float]:
        """The log-prob of each response token after the prompt and the tokens before it (temperature 1)."""

    def probe(self, prompt: list[int], response: list[int], vision: VisionInputs | None,
              modules: list[str]) -> dict[str, Tensor]:
        """The output of each of ``modules`` (Hugging Face module names) while scoring ``response``, as flat float32
        CPU tensors in the order they ran (:mod:`lingshu_rl.models.probe`)."""
