"""One step's rollouts: its prompts drawn, their images prepared, their generations dealt to the rollout workers
and each chunk sent to scoring as soon as it is generated.

:func:`start_rollouts` returns at once with :class:`Rollouts` whose generations arrive in the background, so that
the controller can overlap them with other work (``grpo.one_step_off``: step t+1 generates while step t scores
and updates). With one-step-off, the generations still in flight when a checkpoint is written are saved with it
(:func:`save_generations`) and the resumed run trains on exactly them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from safetensors.torch import load_file, save_file

from lingshu_rl.data.sample import Sample
from lingshu_rl.data.vision import VisionInputs, vision_inputs
from lingshu_rl.grpo.failures import get_or_die
from lingshu_rl.grpo.placement import ROLLOUT, Roles
from lingshu_rl.rollout.protocol import Generation, SamplingParams


@dataclass
class Prompt:
    sample: Sample
    ids: list[int]  # chat-templated prompt tokens (image pads expanded)
    image_processor: Any = None  # for a sample with images: prepared in a Ray task when the prompt is drawn


@dataclass
class Rollouts:
    """A step's prompts and their ``n`` generations each (grouped by prompt), arriving in ``future``."""

    step: int
    prompts: list[Prompt]
    visions: list[ray.ObjectRef | None]  # each prompt's prepared images (None: text only)
    policy_version: int  # how many steps had updated the weights that generate them
    data_position: int  # the sampler's position before these prompts were drawn
    future: Future = field(repr=False)
    scoring: list[tuple[int, Any]] = field(default_factory=list)  # (first prompt, its chunk's pending scores)

    def generations(self) -> list[Generation]:
        return self.future.result()

    def scores_submitted(self) -> list[Any]:
        """Every chunk's pending scores, in prompt order (once :meth:`generations` has returned)."""
        return [pending for _, pending in sorted(self.scoring, key=lambda s: s[0])]


@ray.remote(num_cpus=0, max_retries=0)
def _prepare_visions(work: list[tuple[Any, Sample]]) -> VisionInputs | None | tuple[VisionInputs | None, ...]:
    """Several prompts' images in one task (one object each): a task per prompt would start a Ray worker process
    per prompt (these tasks take no CPUs, so nothing caps how many run at once), each importing torch."""
    out = tuple(vision_inputs(processor, sample) for processor, sample in work)
    return out[0] if len(out) == 1 else out


def _shares(count: int, workers: int) -> list[slice]:
    """Contiguous shares of ``count`` prompts, one per rollout worker (where each prompt's images are prepared)."""
    size = -(-count // workers)
    return [slice(i * size, (i + 1) * size) for i in range(workers)]


def prepare_visions(prompts: list[Prompt], roles: Roles) -> list[ray.ObjectRef | None]:
    """Each prompt's images, decoded and preprocessed once per prompt, in one Ray task per rollout worker's share of
    the prompts, preferably on that worker's node; each prompt's pixels are an object of their own in Ray's object
    store, where the rollout worker and the training ranks fetch their own rows' (the driver never holds them: a
    data set's pixels need not fit anywhere)."""
    nodes = {p.name: p.node_id for p in roles.placed}
    out: list[ray.ObjectRef | None] = [None] * len(prompts)
    for i, part in enumerate(_shares(len(prompts), len(roles.rollouts))):
        with_images = [j for j in range(len(prompts))[part] if prompts[j].sample.images]
        if not with_images:
            continue
        node = nodes.get(ROLLOUT.format(i))
        options: dict[str, Any] = {"num_returns": len(with_images)}
        if node:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
        work = [(prompts[j].image_processor, prompts[j].sample) for j in with_images]
        refs: Any = _prepare_visions.options(**options).remote(work)
        for j, ref in zip(with_images, refs if len(with_images) > 1 else [refs]):
            out[j] = ref
    return out


OnChunk = Callable[[slice, list[Generation]], None]


def deal(roles: Roles, prompts: list[list[int]], params: SamplingParams, visions: list[ray.ObjectRef | None],
         on_chunk: OnChunk | None = None, chunks_per_worker: int = 2) -> list[Generation]:
    """Generate for ``prompts`` on the rollout workers, dealt by load: the prompts are cut into chunks (about
    ``chunks_per_worker`` per worker) and each worker takes the next chunk when it finishes one, so a slow worker
    generates fewer. ``on_chunk(prompts, generations)`` is called as each chunk arrives. Results come back grouped
    by prompt, in prompt order. One worker gets everything at once. A chunk's sampling seed depends on where it
    starts, not on the worker that takes it: the same samples whoever is slow."""
    workers = len(roles.rollouts)
    size = len(prompts) if workers == 1 else max(1, -(-len(prompts) // (workers * chunks_per_worker)))
    todo = [slice(start, start + size) for start in range(0, len(prompts), size)]
    done: dict[int, list[Generation]] = {}
    running: dict[ray.ObjectRef, tuple[int, int]] = {}  # call -> (worker, chunk)

    def give(worker: int) -> None:
        chunk = len(done) + len(running)
        if chunk < len(todo):
            part = todo[chunk]
            images = visions[part] if any(v is not None for v in visions[part]) else None
            chunk_params = replace(params, seed=params.seed + 7919 * part.start)
            running[roles.rollouts[worker].generate.remote(prompts[part], chunk_params, images)] = (worker, chunk)

    for worker in range(min(workers, len(todo))):
        give(worker)
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        worker, chunk = running.pop(ref)
        done[chunk] = get_or_die(ref, ROLLOUT.format(worker))
        give(worker)
        if on_chunk is not None:
            on_chunk(todo[chunk], done[chunk])
    return [g for chunk in range(len(todo)) for g in done[chunk]]


def start_rollouts(step: int, prompts: list[Prompt], roles: Roles, params: SamplingParams, policy_version: int,
                   data_position: int, background: ThreadPoolExecutor,
                   score: Callable[[list[Prompt], list[Generation]], Any],
                   ready: list[Generation] | None = None) -> Rollouts:
    """Prepare the prompts' images and start generating (in ``background``); ``score(prompts, generations)``
    submits a chunk's scoring as soon as it is generated. ``ready``: generations already made (read from a
    checkpoint), none to start."""
    visions = prepare_visions(prompts, roles)
    rollouts = Rollouts(step, prompts, visions, policy_version, data_position, Future())

    def scored(part: slice, gens: list[Generation]) -> None:
        rollouts.scoring.append((part.start, score(prompts[part], gens)))

    if ready is not None:
        scored(slice(0, len(prompts)), ready)
        rollouts.future.set_result(ready)
    else:
        rollouts.future = background.submit(deal, roles, [p.ids for p in prompts], params, visions, scored)
    return rollouts


def save_generations(directory: Path, rollouts: Rollouts) -> None:
    """The generations of ``rollouts`` (finished) as ``rollouts.safetensors`` (token ids, log-probs) and
    ``rollouts.json`` (texts, finish reasons, which step and weights made them)."""
    gens = rollouts.generations()

    def flat(lists: list[list[Any]], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([x for values in lists for x in values], dtype=dtype)

    tensors = {"prompt_ids": flat([g.prompt_ids for g in gens], torch.int64),
               "prompt_lengths": torch.tensor([len(g.prompt_ids) for g in gens], dtype=torch.int64),
               "response_ids": flat([g.response_ids for g in gens], torch.int64),
               "response_lengths": torch.tensor([len(g.response_ids) for g in gens], dtype=torch.int64)}
    if all(g.logprobs is not None for g in gens):
        tensors["logprobs"] = flat([g.logprobs or [] for g in gens], torch.float64)
    save_file(tensors, str(directory / "rollouts.safetensors"))
    (directory / "rollouts.json").write_text(json.dumps({
        "step": rollouts.step, "policy_version": rollouts.policy_version, "data_position": rollouts.data_position,
        "texts": [g.text for g in gens], "finish_reasons": [g.finish_reason for g in gens]}))


def load_generations(directory: Path) -> tuple[dict[str, Any], list[Generation]] | None:
    """What :func:`save_generations` wrote (its JSON header and the generations), or None if it wrote nothing."""
    if not (directory / "rollouts.json").is_file():
        return None
    header = json.loads((directory / "rollouts.json").read_text())
    tensors = load_file(str(directory / "rollouts.safetensors"))

    def split(values: torch.Tensor, lengths: torch.Tensor) -> list[list[Any]]:
        return [part.tolist() for part in values.split(lengths.tolist())]

    prompts = split(tensors["prompt_ids"], tensors["prompt_lengths"])
    responses = split(tensors["response_ids"], tensors["response_lengths"])
    logprobs: list[Any] = split(tensors["logprobs"], tensors["response_lengths"]) if "logprobs" in tensors \
        else [None] * len(prompts)
    gens = [Generation(p, r, t, f, lp) for p, r, t, f, lp in
            zip(prompts, responses, header["texts"], header["finish_reasons"], logprobs)]
    return header, gens
