"""Training engine on plain torch + transformers: one device, or FSDP2 data parallel over a group of ranks.

Trainable models keep float32 parameters (the master weights the optimizer updates) and compute in
``model.dtype``: under autocast on one device, by FSDP2's mixed-precision policy when sharded. A bf16 update of
1e-6 would otherwise round to nothing for most weights. A frozen model (the reference policy) is stored in
``model.dtype``. Log-probs are formed at response positions only, in chunks (:mod:`lingshu_rl.train.logprob`).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedModel

from lingshu_rl.config import ModelConfig, TrainConfig
from lingshu_rl.data.vision import copy_processor_files
from lingshu_rl.models.hf import (
    DTYPES,
    load_model,
    packed_attention_mask,
    pick_device,
    vision_language_positions,
)
from lingshu_rl.models.probe import capture, probed_modules
from lingshu_rl.models.transfer import Rendezvous, TensorSpec, WeightChannel
from lingshu_rl.train import fsdp
from lingshu_rl.train.batch import TokenBatch
from lingshu_rl.train.fsdp import DistInfo
from lingshu_rl.train.logprob import response_logprobs
from lingshu_rl.train.optim import check_lr_groups, make_optimizer
from lingshu_rl.train.prefix import SharedPrompts, find_shared_prompts, shared_prompt_forward
from lingshu_rl.train.protocol import Loss
from lingshu_rl.train.split import MiniBatch, blank_row, plan_updates
from lingshu_rl.train.update import run_updates

EXPORT_SHARD_BYTES = 2 << 30  # the Hugging Face export's safetensors shards


def freeze(model: torch.nn.Module, patterns: list[str]) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze parameters whose names match any glob in ``patterns``; return the trainable (name, param) pairs."""
    named = list(model.named_parameters())
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n, _ in named)]
    if unmatched:
        raise ValueError(f"freeze patterns match no parameter: {unmatched} (names look like {named[0][0]!r}, "
                         f"{named[-1][0]!r})")
    for name, param in named:
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            param.requires_grad_(False)
    trainable = [(n, p) for n, p in named if p.requires_grad]
    if not trainable:
        raise ValueError(f"freeze patterns {patterns} leave nothing to train")
    return trainable


class PolicyModel(torch.nn.Module):
    """A Hugging Face model whose forward returns per-token log-probs (and entropy) of the response tokens.

    One module from inputs to log-probs, so that FSDP's root (this module) gathers the embeddings, final norm
    and output head around the whole computation, and no full ``[N, T, V]`` logits tensor is ever formed.
    """

    def __init__(self, lm: PreTrainedModel, chunk: int, blank_image: bool = False):
        super().__init__()
        self.lm, self.chunk, self.blank_image = lm, chunk, blank_image

    @contextlib.contextmanager
    def _vision_tower_runs(self, has_images: bool) -> Iterator[None]:
        """``blank_image`` (an FSDP2-sharded vision-language model): a forward without images still runs the vision
        tower, on a blank 2x2-token image right after the token embedding (where the real images go), adding 0 x its
        output. Each vision block's all-gather and gradient reduce-scatter is a collective of every rank, so a rank
        whose micro-batch is text-only would otherwise pair its next collective with its peers' vision ones."""
        if has_images or not self.blank_image:
            yield
            return
        vision = self.lm.config.vision_config
        merge = vision.spatial_merge_size

        def add_blank_image(module: torch.nn.Module, args: object, embeds: Tensor) -> Tensor:
            handle.remove()  # once: the first embedding call is the pass that would have taken the images
            width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
            pixels = torch.zeros(4 * merge * merge, width, dtype=embeds.dtype, device=embeds.device)
            grid = torch.tensor([[1, 2 * merge, 2 * merge]], device=embeds.device)
            tower = cast(torch.nn.Module, self.lm.base_model.visual)
            features = tower(pixels, grid_thw=grid).pooler_output
            return embeds + 0.0 * features.mean()

        handle = self.lm.get_input_embeddings().register_forward_hook(add_blank_image)
        try:
            yield
        finally:
            handle.remove()

    def forward(self, inputs: dict[str, Tensor], input_ids: Tensor, response_mask: Tensor, temperature: float,
                with_entropy: bool, share: SharedPrompts | None = None) -> tuple[Tensor, Tensor | None]:
        """``share``: rows sharing prompts (:mod:`lingshu_rl.train.prefix`); ``inputs`` then holds every row's
        positions and the pixel inputs of the rows the prompt pass runs on."""
        head = self.lm.get_output_embeddings()
        if share is None:
            with self._vision_tower_runs("pixel_values" in inputs):
                hidden = self.lm.base_model(input_ids=input_ids, **inputs).last_hidden_state
            return response_logprobs(hidden, head, input_ids, response_mask, temperature, with_entropy, self.chunk)
        vision = {k: v for k, v in inputs.items() if k not in ("attention_mask", "position_ids")}
        with self._vision_tower_runs(bool(vision)):
            hidden, index, valid = shared_prompt_forward(self.lm.base_model, input_ids, inputs["position_ids"], share,
                                                         vision)
        logprobs, entropy = response_logprobs(hidden, head, input_ids.gather(1, index),
                                              response_mask.gather(1, index) * valid, temperature, with_entropy,
                                              self.chunk)
        rows, cols = valid.nonzero(as_tuple=True)

        def scatter(values: Tensor) -> Tensor:  # back to the rows' own positions
            return torch.zeros_like(response_mask, dtype=torch.float32).index_put((rows, index[rows, cols]),
                                                                                  values[rows, cols])

        return scatter(logprobs), scatter(entropy) if entropy is not None else None

    def blocks(self) -> list[torch.nn.Module]:
        """The units FSDP shards one by one: the repeated blocks (decoder layers, vision blocks: transformers lists
        their classes in ``_no_split_modules``) and, when not tied to each other, the input embeddings and the
        output head (gathered only while in use; tied, they stay with the root)."""
        names = set(getattr(self.lm, "_no_split_modules", None) or [])
        blocks = [m for m in self.lm.modules() if type(m).__name__ in names]
        embed, head = self.lm.get_input_embeddings(), self.lm.get_output_embeddings()
        if head is not None and head.weight is not embed.weight:
            blocks += [embed, head]
        return blocks


def _pixels(row: TokenBatch) -> tuple[Tensor, Tensor] | None:
    if row.pixel_values is None or row.image_grid_thw is None or not len(row.image_grid_thw):
        return None
    return row.pixel_values, row.image_grid_thw


class TorchEngine:
    """A causal LM (or Qwen2-VL-family model) with AdamW. ``trainable=False`` gives a frozen model (the reference
    policy). With ``dist`` it is one rank of an FSDP2 group (:class:`lingshu_rl.train.group.PolicyGroup`)."""

    def __init__(self, model_path: str, model_cfg: ModelConfig, train_cfg: TrainConfig, total_steps: int = 1,
                 trainable: bool = True, lr: float | None = None, dist_info: DistInfo | None = None):
        if train_cfg.threads:
            torch.set_num_threads(train_cfg.threads)
        self.cfg, self.model_path, self.trainable = train_cfg, model_path, trainable
        self.max_grad_norm = train_cfg.max_grad_norm
        self.device = pick_device(train_cfg.device)
        self.sharded = dist_info is not None
        if self.sharded:
            assert dist_info is not None
            fsdp.init_process_group(dist_info, self.device)
        self.compute_dtype = DTYPES[model_cfg.dtype]
        storage = torch.float32 if trainable else self.compute_dtype  # float32 master weights for training
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=model_cfg.trust_remote_code)
        if self.sharded:  # a host's ranks take turns: one full copy on it at a time, then each keeps its shard
            mesh = fsdp.device_mesh(self.device, train_cfg.shard_size)
            mine, turns = fsdp.load_turn(fsdp.host_names(), dist.get_rank())
            for turn in range(turns):
                if turn == mine:
                    self.model = self._build(model_path, model_cfg, storage, torch.device("cpu"))
                    if not train_cfg.offload:
                        self.model.to(self.device)
                    fsdp.shard_model(self.model, self.model.blocks(), mesh, self.compute_dtype, train_cfg.offload)
                dist.barrier()
        else:
            self.model = self._build(model_path, model_cfg, storage, self.device)
        lm = self.model.lm
        self.multimodal = hasattr(lm.config, "vision_config")
        self.model.train(trainable)
        self.channel: WeightChannel | None = None  # rank 0's end of the weight-sync group, once joined
        if trainable:
            named = [(n, p) for n, p in lm.named_parameters() if p.requires_grad]  # sharding replaced them
            self.params = [p for _, p in named]
            check_lr_groups([name for name, _ in named], train_cfg)
            self.optimizer, self.scheduler = make_optimizer(named, train_cfg, total_steps, lr)

    def _build(self, model_path: str, model_cfg: ModelConfig, storage: torch.dtype,
               device: torch.device) -> PolicyModel:
        lm = load_model(model_path, storage, model_cfg.trust_remote_code, device)
        lm.config.use_cache = False
        if self.cfg.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.trainable:
            freeze(lm, self.cfg.freeze)
        else:
            lm.requires_grad_(False)
        return PolicyModel(lm, self.cfg.logprob_chunk, blank_image=self.sharded and hasattr(lm.config, "vision_config"))

    @property
    def lm(self) -> PreTrainedModel:
        return self.model.lm

    # --- forward -------------------------------------------------------------------------------------------------

    def _inputs(self, batch: TokenBatch, images: TokenBatch | None = None) -> dict[str, Tensor]:
        """Attention mask and positions (and images) for the model; packed rows get a block-diagonal mask.
        ``images``: the rows whose pixels the model is given (default: ``batch``'s own)."""
        if batch.pixel_values is not None and not self.multimodal:
            raise ValueError("the batch has images but the model has no vision tower")
        input_ids = batch.input_ids.to(self.device)
        if batch.segment_ids is not None:  # packed rows: positions restart per sample, samples never see each other
            assert batch.position_ids is not None, "packed rows carry their positions (train.batch.pack)"
            mask = packed_attention_mask(batch.segment_ids, self.compute_dtype).to(self.device)
        else:
            mask = batch.attention_mask.to(self.device)
        if not self.multimodal:
            positions = (mask.cumsum(dim=-1) - 1).clamp(min=0) if batch.position_ids is None else \
                batch.position_ids.to(self.device)
            return {"attention_mask": mask, "position_ids": positions}
        grid = batch.image_grid_thw.to(self.device) if batch.image_grid_thw is not None else None
        segments = batch.segment_ids.to(self.device) if batch.segment_ids is not None else None
        positions = vision_language_positions(self.lm, input_ids, batch.attention_mask.to(self.device), segments, grid)
        source = batch if images is None else images
        pixels = source.pixel_values.to(self.device, self.compute_dtype) if source.pixel_values is not None else None
        grid = source.image_grid_thw.to(self.device) if source.image_grid_thw is not None else None
        inputs = {"attention_mask": mask, "position_ids": positions}
        return inputs | ({"pixel_values": pixels} if pixels is not None else {}) | (
            {"image_grid_thw": grid} if grid is not None else {})

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Compute in ``model.dtype`` over float32 master weights on one device (FSDP2 casts by its policy)."""
        if self.sharded or not self.trainable or self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def forward(self, micro: TokenBatch, temperature: float, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probs ``[n, T]`` of ``micro``'s response tokens (with gradients), and optionally entropy.
        Rows that share a prompt run it once (``train.share_prompts``, :mod:`lingshu_rl.train.prefix`)."""
        input_ids, response_mask = micro.input_ids.to(self.device), micro.response_mask.to(self.device)
        share = self._shared_prompts(micro)
        # shared prompts: every row's positions, and the images of the rows the prompt pass runs on
        inputs = self._inputs(micro, None if share is None else micro.select(share.group_rows.cpu()))
        with self._autocast():
            return self.model(inputs, input_ids, response_mask, temperature, with_entropy, share)

    def _shared_prompts(self, micro: TokenBatch) -> SharedPrompts | None:
        """Prompt groups of a GRPO micro-batch (rows collated with their prompt lengths, not packed); the rule
        depends on the kind of batch and the mode only, never on the data, so FSDP ranks run the same passes.
        Training with activation checkpointing runs every row in full: transformers drops the cached keys and
        values inside recomputed layers."""
        if not self.cfg.share_prompts or micro.prompt_lengths is None or micro.segment_ids is not None:
            return None
        if self.cfg.gradient_checkpointing and self.model.training:
            return None
        images = None
        if micro.image_counts is not None:  # equal prompt tokens with other images are another prompt
            images = [_pixels(micro.select(slice(i, i + 1))) for i in range(len(micro))]
        return find_shared_prompts(micro.input_ids, micro.attention_mask, micro.prompt_lengths, images, self.device)

    @torch.no_grad()
    def logprobs(self, batch: TokenBatch, temperature: float = 1.0, micro_batches: int = 0) -> Tensor:
        """Per-token log-probs ``[N, T]`` of the policy itself (old / reference log-probs): dropout off, so the
        values are deterministic and those of the model that sampled; the previous train/eval mode is restored.
        ``micro_batches``: forward passes to run at least (FSDP ranks with fewer rows run blank ones)."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
            micros = batch.chunks(self.cfg.micro_batch_size)
            start = 0
            for micro in micros:
                lp = self.forward(micro, temperature, False)[0].cpu()
                out[start:start + len(micro), :lp.shape[1]] = lp
                start += len(micro)
            for _ in range(micro_batches - len(micros)):
                self.forward(blank_row(batch), temperature, False)
        finally:
            self.model.train(was_training)
        return out * batch.response_mask

    # --- update (the loop itself is lingshu_rl.train.update's) ---------------------------------------------------

    def update(self, work: TokenBatch | list[MiniBatch], loss: Loss) -> dict[str, float]:
        """``train.updates_per_step`` optimiser steps over ``work``: a whole batch, or this rank's planned share
        of one (:func:`lingshu_rl.train.split.plan_updates`)."""
        assert self.trainable, "this engine is frozen"
        if isinstance(work, TokenBatch):
            work = plan_updates(work, self.cfg.updates_per_step, 1, self.cfg.micro_batch_size)[0]
        return run_updates(self, work, loss, self.cfg.micro_batch_size)

    def backward(self, loss: Tensor) -> None:
        # sharded: FSDP averages gradients over the ranks, and each rank's loss is its share of the global loss
        (loss * dist.get_world_size() if self.sharded else loss).backward()

    def clip_grad_norm(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        full = getattr(norm, "full_tensor", None)  # sharded: a DTensor holding the global norm
        return float(full() if full is not None else norm)

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.sharded:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    # --- weights and checkpoints ---------------------------------------------------------------------------------

    def _hf_tensors(self, tied_once: bool, to_cpu: bool = True) -> Iterator[tuple[str, Tensor]]:
        """The model's tensors under Hugging Face names, in ``model.dtype``, gathered one at a time."""
        return ((name, t.to(self.compute_dtype) if t.is_floating_point() else t)
                for name, t in fsdp.gathered_tensors(self.model, "lm.", tied_once, to_cpu))

    def hf_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Every tensor under its Hugging Face name in ``model.dtype``, tied ones under each name (vLLM on CPU
        refreshes a tied head only when its own name arrives), on this engine's device: for a rollout engine in
        this process (unsharded: a sharded engine gathers, which its peers must join)."""
        return self._hf_tensors(tied_once=False, to_cpu=False)

    def _writes(self) -> bool:
        return not self.sharded or dist.get_rank() == 0

    def weights(self) -> dict[str, Tensor]:
        """Full weights under Hugging Face names, tied ones under each name, in ``model.dtype`` (on rank 0 only
        when sharded: the other ranks take part in each gather and keep nothing)."""
        tensors = self._hf_tensors(tied_once=False)
        if self._writes():
            return dict(tensors)
        for _ in tensors:  # each gather is a collective: every rank takes part
            pass
        return {}

    def weight_manifest(self) -> list[TensorSpec]:
        """What :meth:`send_weights` sends: Hugging Face names (tied weights under each name, as in a state dict:
        vLLM on CPU refreshes its tied output head only when ``lm_head.weight`` comes), full shapes, ``model.dtype``."""
        return [TensorSpec(name, tuple(t.shape), self.compute_dtype if t.is_floating_point() else t.dtype)
                for name, t in fsdp.state_entries(self.model, "lm.", tied_once=False)]

    def join_weight_sync(self, rendezvous: Rendezvous, bucket_bytes: int) -> None:
        """Rank 0 becomes the source of the weight-sync group (:mod:`lingshu_rl.models.transfer`)."""
        if self._writes():
            self.channel = WeightChannel(rendezvous, 0, self.weight_manifest(), bucket_bytes, self.device)

    def send_weights(self) -> int:
        """Gather each tensor (every rank) and broadcast it in buckets to the rollout workers (rank 0)."""
        tensors = self._hf_tensors(tied_once=False, to_cpu=False)
        if self.channel is not None:
            return self.channel.send(tensors)
        for _ in tensors:
            pass
        return 0

    @torch.no_grad()
    def probe(self, batch: TokenBatch) -> dict[str, Tensor]:
        """Each probed module's output on ``batch`` (:mod:`lingshu_rl.models.probe`); every rank runs the same
        forward (sharded layers are gathered in it)."""
        modules = probed_modules(name for name, _ in self.lm.named_parameters())
        with capture(self.model, {f"lm.{m}": m for m in modules}) as outputs:
            self.logprobs(batch.with_(prompt_lengths=None), 1.0)  # one full forward: each module called once
        return dict(outputs)

    def save(self, directory: Path) -> None:
        """``directory/model``: the Hugging Face model in ``model.dtype``, gathered one tensor at a time and
        streamed into safetensors shards by rank 0 (never a whole model in memory, on any rank);
        ``directory/train_state``: float32 weights and optimizer state, each rank its shard; ``scheduler.pt``."""
        directory = Path(directory)
        model_dir = directory / "model"
        if self._writes():
            model_dir.mkdir(parents=True, exist_ok=True)
            self.lm.config.dtype = self.compute_dtype  # what the exported tensors hold
            self.lm.config.save_pretrained(model_dir)
            if self.lm.generation_config is not None:
                self.lm.generation_config.save_pretrained(model_dir)
            self.tokenizer.save_pretrained(model_dir)
            copy_processor_files(self.model_path, model_dir)  # a vision model's image processor
            if self.trainable:
                torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
        fsdp.write_safetensors(model_dir, self._hf_tensors(tied_once=True), EXPORT_SHARD_BYTES, self._writes())
        if self.trainable:
            fsdp.save_train_state(directory / "train_state", self.model, self.optimizer)
        if self.sharded:
            dist.barrier()

    def load_training_state(self, directory: Path) -> None:
        """Restore float32 weights, optimizer and scheduler from :meth:`save` (at any data-parallel size)."""
        fsdp.load_train_state(Path(directory) / "train_state", self.model, self.optimizer)
        self.scheduler.load_state_dict(torch.load(Path(directory) / "scheduler.pt", weights_only=True))
