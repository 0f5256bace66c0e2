"""Qwen2.5-VL under megatron: the language model is megatron's ``GPTModel`` (tensor parallel, multimodal RoPE with
the checkpoint's ``mrope_section``); the vision tower and merger are Hugging Face's own modules, replicated on every
tensor-parallel rank and attached to the GPTModel as its ``visual`` submodule (so ``visual.*`` parameters sit beside
megatron's in one name space and every engine path, from freezing to export, sees them).

Why replicated rather than split: the tower is about 9% of a 7B Lingshu (670M parameters, 1.3 GB in bf16) and a
small part of its compute, so a copy per rank costs little, and it needs no gradient collective over the
tensor-parallel ranks: the language model's first column-parallel layer all-reduces the gradient of its input, so
every rank receives the same full gradient of the image features and computes the same tower gradients (over
data-parallel replicas they are summed like every other gradient). Megatron-core's own vision modules would need a
second converter for the tower and Transformer Engine for their attention; mbridge / megatron-bridge do not run here
(README, "Scaling out").

Positions: Hugging Face's own rule (``get_rope_index``) on a skeleton of the model built on the meta device (no
memory), so text, image and packed rows get exactly the positions the transformers engine gives them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from lingshu_rl.models.hf import vision_language_positions
from lingshu_rl.train.batch import TokenBatch


class VisionLanguage:
    """What a vision-language megatron model needs beside its GPTModel: the position rule and the tower's forward."""

    def __init__(self, hf_config: Any, dtype: torch.dtype):
        from transformers import AutoModelForImageTextToText

        with torch.device("meta"):  # the architecture only: its position rule reads the config, no weights
            self.skeleton = AutoModelForImageTextToText.from_config(hf_config)
        self.image_token_id = int(hf_config.image_token_id)
        self.dtype = dtype

    def build_tower(self) -> PreTrainedModel:
        """A fresh vision tower + merger (weights from the checkpoint later), Hugging Face's class for the model."""
        tower_class = type(self.skeleton.model.visual)
        return tower_class._from_config(self.skeleton.config.vision_config, dtype=self.dtype)

    def positions(self, batch: TokenBatch, device: torch.device) -> Tensor:
        """``[3, N, T]`` rotary positions (text, height, width) as the transformers engine computes them."""
        grid = batch.image_grid_thw.to(device) if batch.image_grid_thw is not None else None
        segments = batch.segment_ids.to(device) if batch.segment_ids is not None else None
        return vision_language_positions(self.skeleton, batch.input_ids.to(device), batch.attention_mask.to(device),
                                         segments, grid)

    def embed(self, model: Any, batch: TokenBatch, device: torch.device) -> Tensor:
        """The decoder input ``[T, N, h]`` of ``model`` (a GPTModel with a ``visual`` tower): token embeddings with each
        image token's slot holding its image feature."""
        input_ids = batch.input_ids.to(device)
        embeds = model.embedding(input_ids=input_ids, position_ids=None)  # [T, N, h], reduced over the TP ranks
        if batch.pixel_values is None or batch.image_grid_thw is None or not len(batch.image_grid_thw):
            return embeds
        features = model.visual(batch.pixel_values.to(device, self.dtype), grid_thw=batch.image_grid_thw.to(device))
        features = features.pooler_output.to(embeds.dtype)
        slots = input_ids == self.image_token_id  # [N, T]: filled row by row, in the order the features come
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(f"{int(slots.sum())} image tokens in the batch but {features.shape[0]} image features "
                             f"from its pixels (image_grid_thw {batch.image_grid_thw.tolist()})")
        rows = embeds.transpose(0, 1).masked_scatter(slots[..., None], features)
        return rows.transpose(0, 1).contiguous()
