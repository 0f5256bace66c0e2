"""Loading Hugging Face models and building their inputs: shared by the training and rollout engines.

A causal LM or a Qwen2-VL-family vision-language model (its config has a ``vision_config``); explicit positions
(3-D rotary positions for VL models) and the block-diagonal mask of packed rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def local_weights(model_path: str) -> Path:
    """The directory on this machine holding ``model_path``'s safetensors: the path itself, or for a hub id its
    snapshot in the Hugging Face cache, fetched as ``from_pretrained`` fetches it (same cache, same errors, e.g.
    offline with nothing cached)."""
    if Path(model_path).is_dir():
        return Path(model_path)
    from transformers.utils.hub import cached_file

    index = cached_file(model_path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index is None:
        return Path(cached_file(model_path, "model.safetensors") or "").parent
    for name in sorted(set(json.loads(Path(index).read_text())["weight_map"].values())):
        cached_file(model_path, name)
    return Path(index).parent


def placeholder_token_ids(config: object) -> list[int]:
    """A vision-language model's image and video placeholder tokens (empty for a text model). They stand for
    image features in a prompt; a response holding one cannot be trained on (the forward would look for its
    features), so the rollout engines never sample them."""
    if not hasattr(config, "vision_config"):
        return []
    return sorted({int(i) for i in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
                   if i is not None})


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


def vision_language_positions(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor,
                               segment_ids: Tensor | None, image_grid_thw: Tensor | None) -> Tensor:
    """Qwen2-VL-family positions of packed rows (``segment_ids`` given) or of padded ones."""
    if segment_ids is not None:
        return packed_multimodal_positions(model, input_ids, segment_ids, image_grid_thw)
    return multimodal_positions(model, input_ids, attention_mask, image_grid_thw)


def packed_attention_mask(segment_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """``[N, 1, T, T]`` additive mask: a token attends to earlier tokens of its own packed sample only."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
    allowed = (same & causal)[:, None]
    # padding rows attend to themselves so no softmax row is empty (their outputs are masked out anyway)
    allowed = allowed | torch.eye(length, dtype=torch.bool)[None, None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
