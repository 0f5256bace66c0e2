"""Training engine on plain torch + transformers (CPU, or one GPU)."""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, PreTrainedModel

from lingshu_rl.config import ModelConfig, TrainConfig
from lingshu_rl.data.vision import copy_processor_files
from lingshu_rl.grpo.algorithm import entropy_from_logits, token_logprobs
from lingshu_rl.train.batch import TokenBatch, loss_totals
from lingshu_rl.train.optim import make_optimizer
from lingshu_rl.train.protocol import Loss

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def load_model(model_path: str, dtype: torch.dtype, trust_remote_code: bool,
               device: torch.device | str = "cpu") -> PreTrainedModel:
    """A causal LM, or a vision-language model (Qwen2-VL family: its config has a ``vision_config``)."""
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = auto.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    # transformers wraps Module.to with functools.wraps, which type checkers read as an unbound signature
    return model.to(device)  # type: ignore[arg-type]


def multimodal_positions(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor,
                         image_grid_thw: Tensor | None) -> Tensor:
    """Qwen2-VL-family 3-D rotary positions (text, height, width) for a padded batch; image tokens get their
    patch coordinates. Passing them explicitly keeps padded rows exact and avoids the model's cached state."""
    image_types = (input_ids == model.config.image_token_id).long()
    positions, _ = model.model.get_rope_index(input_ids, image_types, image_grid_thw=image_grid_thw,
                                              attention_mask=attention_mask)
    return positions


def packed_multimodal_positions(model: PreTrainedModel, input_ids: Tensor, segment_ids: Tensor,
                                image_grid_thw: Tensor | None) -> Tensor:
    """:func:`multimodal_positions` for packed rows: every packed sample gets its own positions, from 0, as if
    it were alone (its images are the next ones of the row's, in order)."""
    positions = torch.zeros((3, *input_ids.shape), dtype=torch.long, device=input_ids.device)
    merge = model.config.vision_config.spatial_merge_size
    grids = list(image_grid_thw) if image_grid_thw is not None else []
    for row in range(input_ids.shape[0]):
        for segment in segment_ids[row].unique().tolist():
            if segment == 0:  # padding
                continue
            where = (segment_ids[row] == segment).nonzero().flatten()
            ids = input_ids[row, where][None]
            image_tokens, own = int((ids == model.config.image_token_id).sum()), []
            while image_tokens > 0:  # this sample's images: the next grids, until their tokens are accounted for
                own.append(grids.pop(0))
                image_tokens -= int(own[-1].prod()) // merge ** 2
            grid = torch.stack(own) if own else None
            positions[:, row, where] = multimodal_positions(model, ids, torch.ones_like(ids), grid)[:, 0]
    return positions


def packed_attention_mask(segment_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """``[N, 1, T, T]`` additive mask: a token attends to earlier tokens of its own packed sample only."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
    allowed = (same & causal)[:, None]
    # padding rows attend to themselves so no softmax row is empty (their outputs are masked out anyway)
    allowed = allowed | torch.eye(length, dtype=torch.bool)[None, None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


class TorchEngine:
    """A causal LM with AdamW. ``trainable=False`` gives a frozen model (the reference policy)."""

    def __init__(self, model_path: str, model_cfg: ModelConfig, train_cfg: TrainConfig, total_steps: int = 1,
                 trainable: bool = True, lr: float | None = None):
        if train_cfg.threads:
            torch.set_num_threads(train_cfg.threads)
        self.cfg = train_cfg
        self.model_path = model_path
        self.device = pick_device(train_cfg.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=model_cfg.trust_remote_code)
        self.model = load_model(model_path, _DTYPES[model_cfg.dtype], model_cfg.trust_remote_code, self.device)
        self.multimodal = hasattr(self.model.config, "vision_config")
        self.model.config.use_cache = False
        self.trainable = trainable
        if trainable:
            self.model.train()
            named = freeze(self.model, train_cfg.freeze)
            self.params = [p for _, p in named]
            self.optimizer, self.scheduler = make_optimizer(named, train_cfg, total_steps, lr)
        else:
            self.model.eval()
            self.model.requires_grad_(False)

    def _logits(self, batch: TokenBatch) -> Tensor:
        if batch.pixel_values is not None and not self.multimodal:
            raise ValueError("the batch has images but the model has no vision tower")
        if self.multimodal:
            return self._multimodal_logits(batch)
        if batch.segment_ids is not None:  # packed rows: block-diagonal causal mask, positions restart per sample
            assert batch.position_ids is not None, "packed rows carry their positions (train.batch.pack)"
            mask = packed_attention_mask(batch.segment_ids, self.model.dtype).to(self.device)
            positions = batch.position_ids.to(self.device)
        else:
            mask = batch.attention_mask.to(self.device)
            positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        return self.model(input_ids=batch.input_ids.to(self.device), attention_mask=mask, position_ids=positions).logits

    def _multimodal_logits(self, batch: TokenBatch) -> Tensor:
        input_ids = batch.input_ids.to(self.device)
        grid = batch.image_grid_thw.to(self.device) if batch.image_grid_thw is not None else None
        pixels = batch.pixel_values.to(self.device, self.model.dtype) if batch.pixel_values is not None else None
        if batch.segment_ids is not None:  # packed rows: 3-D positions restart per sample, block-diagonal mask
            mask = packed_attention_mask(batch.segment_ids, self.model.dtype).to(self.device)
            positions = packed_multimodal_positions(self.model, input_ids, batch.segment_ids.to(self.device), grid)
        else:
            mask = batch.attention_mask.to(self.device)
            positions = multimodal_positions(self.model, input_ids, mask, grid)
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, pixel_values=pixels,
                          image_grid_thw=grid).logits

    @torch.no_grad()
    def logprobs(self, batch: TokenBatch, temperature: float = 1.0) -> Tensor:
        """Per-token log-probs ``[N, T]`` of the policy itself (old / reference log-probs): dropout off, so the
        values are deterministic and those of the model that sampled; the previous train/eval mode is restored."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
            start = 0
            for micro in batch.chunks(self.cfg.micro_batch_size):
                lp = token_logprobs(self._logits(micro), micro.input_ids.to(self.device), temperature).cpu()
                out[start:start + len(micro), :lp.shape[1]] = lp
                start += len(micro)
        finally:
            self.model.train(was_training)
        return out * batch.response_mask

    def update(self, batch: TokenBatch, loss: Loss) -> dict[str, float]:
        """``cfg.updates_per_step`` optimiser steps over mini-batches of ``batch``; a non-finite loss or gradient
        norm skips that step (reported as ``actor/nan_skipped``)."""
        assert self.trainable, "this engine is frozen"
        mini_size = math.ceil(len(batch) / self.cfg.updates_per_step)
        per_update = [self._update_once(mini, loss) for mini in batch.chunks(mini_size)]
        metrics = {key: sum(m[key] for m in per_update) / len(per_update) for key in per_update[0]}
        metrics["actor/nan_skipped"] = float(sum(m["actor/nan_skipped"] for m in per_update))
        return metrics

    def _update_once(self, batch: TokenBatch, loss: Loss) -> dict[str, float]:
        num_tokens, num_seqs = loss_totals(batch)  # over this whole update: micro-batching stays exact
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = defaultdict(float)
        finite = True
        for micro in batch.chunks(self.cfg.micro_batch_size):
            micro = micro.with_(**{k: getattr(micro, k).to(self.device) for k in
                                   ("response_mask", "advantages", "old_logprobs", "ref_logprobs")
                                   if getattr(micro, k) is not None})
            logits = self._logits(micro)
            input_ids = micro.input_ids.to(self.device)
            logprobs = token_logprobs(logits, input_ids, loss.temperature) * micro.response_mask
            entropy = entropy_from_logits(logits, loss.temperature) if loss.needs_entropy else None
            value, metrics = loss(logprobs, entropy, micro, num_tokens, num_seqs)
            if not torch.isfinite(value):
                finite = False
                break
            value.backward()
            for key, metric in metrics.items():
                sums[key] += float(metric)
        grad_norm = float("nan")
        if finite:
            max_norm = self.cfg.max_grad_norm or float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**sums, "actor/grad_norm": grad_norm, "actor/lr": float(self.scheduler.get_last_lr()[0]),
                "actor/nan_skipped": 0.0 if finite else 1.0}

    def weights(self) -> dict[str, Tensor]:
        return {name: tensor.detach().cpu() for name, tensor in self.model.state_dict().items()}

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        self.model.save_pretrained(directory / "model", safe_serialization=True)
        self.tokenizer.save_pretrained(directory / "model")
        copy_processor_files(self.model_path, directory / "model")  # a vision model's image processor
        if self.trainable:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       directory / "optimizer.pt")

    def load_training_state(self, directory: Path) -> None:
        state = torch.load(Path(directory) / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
