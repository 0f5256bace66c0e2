"""New weights from the actor to the rollout workers after every update, and a check that they arrived.

Two ways (``rollout.weight_sync``):
- ``collective`` (default): the actor's rank 0 and the rollout workers form a process group of their own
  (:mod:`lingshu_rl.models.transfer`). Each tensor is gathered from the actor's shards (FSDP2 or megatron tensor
  parallel) and broadcast in buckets of ``rollout.sync_bucket_mb``, straight into the rollout engine's loader.
- ``ipc``: the same buckets and the same group, but the bytes do not travel through it: the actor's rank 0 packs
  each bucket into one staging buffer it shares with the rollout workers (POSIX shared memory on CPU, a CUDA IPC
  handle on GPU) and each worker copies the bucket out of it; the group (gloo) only says when. For rollout
  workers colocated with the actor's rank 0: every one must run on its node (checked at start, naming a worker
  elsewhere), on GPU on its device too (an NCCL group needs one device per rank, so ``collective`` cannot serve
  a rollout engine on the trainer's own GPU). The CUDA path is written against torch's documented
  ``reduce_tensor``/CUDA IPC and vLLM's documented ``reload_weights`` API but has NOT run: no GPU where it was
  built; the CPU path is tested.
- ``object_store``: the actor's rank 0 puts the whole state dict in Ray's object store once; every rollout
  worker reads it. Simple and robust, but the whole model is copied and pickled on every sync.
- With ``cluster.hybrid`` the rollout engine lives in the actor's process: its weights are loaded in place from
  the actor's parameters, whatever ``rollout.weight_sync`` says.

After every sync (and once before the first step) a fixed *canary*, a short prompt and response (with an image for
a vision-language model), is scored by the actor and by every rollout worker. Their mean absolute log-prob
difference is logged as ``sync/canary_abs_diff``; above ``rollout.canary_tolerance`` the run stops with
:class:`WeightsOutOfSync`, naming the first module whose output differs (:mod:`lingshu_rl.models.probe`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import ray
import torch
from transformers import AutoTokenizer

from lingshu_rl.config import RunConfig
from lingshu_rl.data.sample import Sample
from lingshu_rl.data.vision import VisionInputs, encode_prompt_with_images, load_image_processor
from lingshu_rl.grpo.failures import Placed, get_or_die, record_nodes
from lingshu_rl.grpo.placement import ACTOR, ROLLOUT, Roles
from lingshu_rl.models.probe import first_difference
from lingshu_rl.models.transfer import Rendezvous, Transport
from lingshu_rl.rollout.vllm_engine import end_of_turn_ids
from lingshu_rl.train.batch import TokenBatch, collate, with_vision
from lingshu_rl.train.group import PolicyGroup

CANARY_QUESTION = ("A 24-year-old woman has fatigue, pallor and a low mean corpuscular volume. Which test comes "
                   "first?\nA. Serum ferritin\nB. Bone marrow biopsy\nC. Hemoglobin electrophoresis\nD. MRI")
CANARY_ANSWER = "Serum ferritin confirms iron deficiency first. The answer is A."
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}  # mean |log-prob difference| of the canary


class WeightsOutOfSync(RuntimeError):
    """A rollout worker's model does not compute what the actor's does after a sync (the message says where)."""


@dataclass
class Canary:
    prompt: list[int]
    response: list[int]
    vision: VisionInputs | None

    def batch(self, pad_id: int) -> TokenBatch:
        return with_vision(collate([self.prompt], [self.response], pad_id), [self.vision])


def canary_image() -> bytes:
    """A fixed 56 x 56 picture (a gradient with a bright square), PNG-encoded: no file needed."""
    from PIL import Image

    x = torch.arange(56, dtype=torch.uint8)
    pixels = torch.stack([x.view(1, -1).expand(56, 56) * 4, x.view(-1, 1).expand(56, 56) * 4,
                          torch.full((56, 56), 90, dtype=torch.uint8)], dim=-1).clone()
    pixels[16:32, 20:40] = 250
    out = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(out, format="PNG")
    return out.getvalue()


def make_canary(model_path: str, trust_remote_code: bool) -> tuple[Canary, int]:
    """The canary for ``model_path``'s tokenizer (and image processor), and the pad id to batch it with."""
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    image_processor = load_image_processor(model_path, trust_remote_code)
    sample = Sample("sync-canary", [{"role": "user", "content": CANARY_QUESTION}], "A",
                    images=[canary_image()] if image_processor is not None else [])
    prompt, vision = encode_prompt_with_images(tokenizer, image_processor, sample)
    response = tokenizer.encode(CANARY_ANSWER, add_special_tokens=False) + end_of_turn_ids(tokenizer)[:1]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Canary(prompt, response, vision), pad_id


class WeightSync:
    """Moves the actor's weights to the rollout workers (:meth:`sync`) and checks them (:meth:`check`)."""

    def __init__(self, roles: Roles, cfg: RunConfig, model_path: str):
        self.roles = roles
        # the rollout engine in the actor's process (cluster.hybrid): weights go in place
        self.method: str = "in_process" if roles.hybrid is not None else cfg.rollout.weight_sync
        if self.method == "ipc":
            check_colocated(where_actors_run(roles), len(roles.rollouts))
        self.canary, pad_id = make_canary(model_path, cfg.model.trust_remote_code)
        self.canary_batch = self.canary.batch(pad_id)  # the actor's view of it, built once
        tolerance = cfg.rollout.canary_tolerance
        self.tolerance = tolerance if tolerance is not None else TOLERANCE[cfg.model.dtype]
        self.probe_every_sync = cfg.rollout.sync_module_check
        if self.method == "in_process":
            print("[lingshu] weight sync: in place (actor, reference and rollout engine in one process)", flush=True)
        elif self.method in ("collective", "ipc"):
            self._connect(cfg.rollout.sync_bucket_mb << 20, cfg.rollout.sync_timeout_s)

    def _connect(self, bucket_bytes: int, timeout_s: float) -> None:
        actor, rollouts = self.roles.actor, self.roles.rollouts
        manifest = get_or_die(actor.weight_manifest.remote(), ACTOR)
        host, port = get_or_die(actor.address.remote(), ACTOR)
        transport: Transport = "ipc" if self.method == "ipc" else "collective"
        rendezvous = Rendezvous(host, port, 1 + len(rollouts), timeout_s, transport)
        refs = [(actor.join_weight_sync.remote(rendezvous, bucket_bytes), ACTOR)]
        refs += [(w.join_weight_sync.remote(rendezvous, 1 + i, manifest, bucket_bytes), ROLLOUT.format(i))
                 for i, w in enumerate(rollouts)]
        _wait_all(refs)  # the store's rendezvous waits for every member: a failed one must stop it at once
        mb = sum(s.nbytes for s in manifest) / 2**20
        via = " through a buffer shared on the actor's node" if transport == "ipc" else ""
        print(f"[lingshu] weight sync: {transport}, {len(manifest)} tensors ({mb:,.1f} MB) in buckets of "
              f"{bucket_bytes / 2**20:g} MB to {len(rollouts)} rollout worker(s){via}", flush=True)

    def sync(self) -> dict[str, float]:
        """Send the actor's weights to every rollout worker, then check them; returns the sync metrics."""
        self.transfer()
        return self.check()

    def transfer(self) -> None:
        """The actor's weights into every rollout engine."""
        actor, rollouts = self.roles.actor, self.roles.rollouts
        if self.method == "in_process":
            assert self.roles.hybrid is not None
            refs = [(self.roles.hybrid.sync_in_place.remote(), ACTOR)]
        elif self.method in ("collective", "ipc"):
            refs = [(actor.send_weights.remote(), ACTOR)]
            refs += [(w.receive_weights.remote(), ROLLOUT.format(i)) for i, w in enumerate(rollouts)]
        else:
            weights = actor.weights.remote()
            refs = [(w.load_weights.remote(weights), ROLLOUT.format(i)) for i, w in enumerate(rollouts)]
        _wait_all(refs)

    def check(self) -> dict[str, float]:
        """Score the canary on the actor and on every rollout worker; stop the run if they disagree."""
        c = self.canary
        batch = self.canary_batch
        trainer = get_or_die(self.roles.actor.logprobs.remote(batch, 1.0), ACTOR)[0]
        trainer = trainer[batch.response_mask[0].bool()]  # [R]
        refs = [(w.score.remote(c.prompt, c.response, c.vision), ROLLOUT.format(i))
                for i, w in enumerate(self.roles.rollouts)]
        diffs = [float((torch.tensor(get_or_die(ref, role)) - trainer).abs().mean()) for ref, role in refs]
        for i, diff in enumerate(diffs):
            if diff > self.tolerance or self.probe_every_sync:
                self._probe(i, diff)
        return {"sync/canary_abs_diff": max(diffs)}

    def _probe(self, index: int, diff: float) -> None:
        """Compare each module's output on the canary (actor vs rollout worker ``index``); raise naming the first
        that differs, or, when the canary missed, say that none does."""
        role, c = ROLLOUT.format(index), self.canary
        trainer = get_or_die(self.roles.actor.probe.remote(self.canary_batch), ACTOR)
        rollout = get_or_die(self.roles.rollouts[index].probe.remote(c.prompt, c.response, c.vision, list(trainer)),
                             role)
        where = first_difference(trainer, rollout, self.tolerance)
        if where is None and diff <= self.tolerance:
            return
        if where is not None:
            place = f"the first module whose output differs is {where}"
        elif not set(trainer) & set(rollout):
            place = "the engines' module outputs could not be compared (this engine pair records none in common)"
        else:
            place = ("every module's output agrees within the tolerance, so the engines compute differently (dtype, "
                     "kernels) rather than hold different weights: raise rollout.canary_tolerance if that is expected")
        raise WeightsOutOfSync(
            f"after the weight sync, {role} does not compute what the actor computes: canary mean |log-prob "
            f"difference| {diff:.3g} (rollout.canary_tolerance {self.tolerance:g}); {place}")


def where_actors_run(roles: Roles) -> list[Placed]:
    """Where the actor's rank 0 and every rollout worker run: ``roles.placed`` (recorded when the roles started),
    else (roles assembled by hand) asked of them now."""
    if roles.placed:
        return roles.placed
    rank0 = roles.actor.ranks[0] if isinstance(roles.actor, PolicyGroup) else roles.actor
    actors = {ACTOR: (ACTOR, rank0)}
    actors.update({ROLLOUT.format(i): (ROLLOUT.format(i), w) for i, w in enumerate(roles.rollouts)})
    return record_nodes(actors)


def check_colocated(placed: list[Placed], workers: int) -> None:
    """``rollout.weight_sync: ipc`` shares a buffer in the memory of the actor's rank 0: raise ValueError naming
    each of the ``workers`` rollout workers that does not run on its node (or whose node is unknown)."""
    nodes = {p.name: p for p in placed}
    source = nodes.get(ACTOR)
    if source is None:
        raise ValueError(f"rollout.weight_sync=ipc: where the actor's rank 0 ({ACTOR}) runs is not known")
    elsewhere = []
    for name in (ROLLOUT.format(i) for i in range(workers)):
        worker = nodes.get(name)
        if worker is None:
            raise ValueError(f"rollout.weight_sync=ipc: where the rollout worker {name} runs is not known")
        if worker.node_id != source.node_id:
            elsewhere.append(f"{name} runs on node {worker.ip} (node id {worker.node_id})")
    if elsewhere:
        raise ValueError(
            f"rollout.weight_sync=ipc shares a buffer in the memory of the actor's rank 0, so every rollout worker "
            f"must run on its node, but {'; '.join(elsewhere)}, and the actor's rank 0 ({ACTOR}) on node {source.ip} "
            f"(node id {source.node_id}): use rollout.weight_sync=collective")


def _wait_all(refs: list[tuple[Any, str]]) -> None:
    """Wait for every call, raising the first error as soon as it comes (the others may be waiting on the failed
    one inside a collective), naming its role."""
    roles = {ref: role for ref, role in refs}
    pending = list(roles)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        get_or_die(done[0], roles[done[0]])
