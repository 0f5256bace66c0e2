"""Images for vision-language models: loading with errors that name the sample, and token ids + pixel inputs
for Qwen2-VL-family models.

A sample's images (``Sample.images``: file paths, or raw bytes) go, in order, at the start of its first user
turn, as the Qwen2-VL / Qwen2.5-VL chat templates expect (``{"type": "image"}`` items before the text; see
:func:`lingshu_rl.data.chat.chat_messages`). The
chat template renders each as ``<|vision_start|><|image_pad|><|vision_end|>``; :func:`expand_image_pads` then
repeats each ``<|image_pad|>`` once per image token (``t*h*w / merge**2`` from the image processor's grid), which
is what the model's forward expects. The compact form (one pad per image) is what vLLM takes
(:func:`compact_image_pads`): it expands prompts itself, and expands already-expanded ones again, silently.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lingshu_rl.data.chat import PromptTooLong, encode_conversation, encode_prompt
from lingshu_rl.data.sample import Sample

IMAGE_PAD = "<|image_pad|>"


class ImageError(ValueError):
    """An image that cannot be read; the message names the sample and the path."""


def load_image(image: str | bytes, sample_id: str) -> Any:
    """``image`` (a path or encoded bytes) as an RGB ``PIL.Image``; :class:`ImageError` names sample and path."""
    from PIL import Image, UnidentifiedImageError

    where = f"{len(image)} bytes" if isinstance(image, bytes) else str(image)
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else Path(image)) as opened:
            return opened.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"sample {sample_id!r}: image not found: {where}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ImageError(f"sample {sample_id!r}: cannot read image {where}: {err}") from None


@dataclass
class VisionInputs:
    """One sample's images as the model takes them: ``pixel_values`` [patches, dim] and ``image_grid_thw``
    [images, 3]; ``images`` are the decoded images themselves (what vLLM takes)."""

    pixel_values: Tensor
    image_grid_thw: Tensor
    images: list[Any]

    def tokens_per_image(self, merge_size: int) -> list[int]:
        return [int(t * h * w) // merge_size ** 2 for t, h, w in self.image_grid_thw.tolist()]


def vision_inputs(image_processor: Any, sample: Sample) -> VisionInputs | None:
    """Load and preprocess ``sample``'s images (``None`` for a text-only sample)."""
    if not sample.images:
        return None
    images = [load_image(image, sample.id) for image in sample.images]
    out = image_processor(images=images, return_tensors="pt")
    return VisionInputs(out["pixel_values"], out["image_grid_thw"], images)


def expand_image_pads(ids: list[int], mask: list[int], vision: VisionInputs, pad_id: int, merge_size: int
                      ) -> tuple[list[int], list[int]]:
    """Repeat the k-th ``pad_id`` of ``ids`` once per token of image k (mask 0 on image tokens)."""
    counts = vision.tokens_per_image(merge_size)
    if ids.count(pad_id) != len(counts):
        raise ValueError(f"{ids.count(pad_id)} image placeholders in the prompt for {len(counts)} images")
    out_ids: list[int] = []
    out_mask: list[int] = []
    image = 0
    for token, m in zip(ids, mask):
        if token == pad_id:
            out_ids += [pad_id] * counts[image]
            out_mask += [0] * counts[image]
            image += 1
        else:
            out_ids.append(token)
            out_mask.append(m)
    return out_ids, out_mask


def compact_image_pads(ids: list[int], pad_id: int) -> list[int]:
    """Collapse every run of ``pad_id`` to one (the form vLLM expands itself)."""
    return [t for i, t in enumerate(ids) if t != pad_id or i == 0 or ids[i - 1] != pad_id]


def merge_vision(parts: list[VisionInputs | None]) -> VisionInputs | None:
    """The images of several sequences packed into one row, in order (``None`` when none has images)."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    return VisionInputs(torch.cat([p.pixel_values for p in present]), torch.cat([p.image_grid_thw for p in present]),
                        [image for p in present for image in p.images])


def stack_vision(rows: list[VisionInputs | None]) -> tuple[Tensor, Tensor, Tensor] | None:
    """Batch tensors for rows in order: ``pixel_values`` (all patches), ``image_grid_thw`` (all images) and
    ``image_counts`` [rows] (images per row); ``None`` when no row has images."""
    present = [r for r in rows if r is not None]
    if not present:
        return None
    counts = torch.tensor([0 if r is None else len(r.image_grid_thw) for r in rows], dtype=torch.long)
    return (torch.cat([r.pixel_values for r in present]), torch.cat([r.image_grid_thw for r in present]), counts)


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def load_image_processor(model_path: str, trust_remote_code: bool = False) -> Any | None:
    """The image processor of a vision-language model (its config has a ``vision_config``), else ``None``."""
    from transformers import AutoConfig, AutoImageProcessor

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if not hasattr(config, "vision_config"):
        return None
    return AutoImageProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def copy_processor_files(source: str | Path, destination: str | Path) -> None:
    """Copy a local model directory's image/processor configs next to a saved copy of its weights."""
    import shutil

    for name in PROCESSOR_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(destination) / name)


def _pad_and_merge(tokenizer: Any, image_processor: Any) -> tuple[int, int]:
    return tokenizer.convert_tokens_to_ids(IMAGE_PAD), int(image_processor.merge_size)


def encode_prompt_with_images(tokenizer: Any, image_processor: Any, sample: Sample, max_tokens: int | None = None
                              ) -> tuple[list[int], VisionInputs | None]:
    """:func:`~lingshu_rl.data.chat.encode_prompt` for a sample that may have images: ids with the image pads
    expanded, and the pixel inputs. ``max_tokens`` counts image tokens too."""
    ids = encode_prompt(tokenizer, sample)
    vision = vision_inputs(image_processor, sample)
    if vision is not None:
        ids, _ = expand_image_pads(ids, [0] * len(ids), vision, *_pad_and_merge(tokenizer, image_processor))
    if max_tokens is not None and len(ids) > max_tokens:
        raise PromptTooLong(f"sample {sample.id!r}: prompt has {len(ids)} tokens (images included), more than the "
                            f"limit {max_tokens} (data.max_prompt_tokens)")
    return ids, vision


def encode_conversation_with_images(tokenizer: Any, image_processor: Any, sample: Sample,
                                    max_length: int | None = None) -> tuple[list[int], list[int], VisionInputs | None]:
    """:func:`~lingshu_rl.data.chat.encode_conversation` for a sample that may have images (pads expanded, image
    tokens never learnt). A cut at ``max_length`` that would split an image's tokens is an error."""
    ids, mask = encode_conversation(tokenizer, sample)
    vision = vision_inputs(image_processor, sample)
    if vision is not None:
        pad_id, merge = _pad_and_merge(tokenizer, image_processor)
        ids, mask = expand_image_pads(ids, mask, vision, pad_id, merge)
        if max_length is not None and pad_id in ids[max_length:]:
            raise ValueError(f"sample {sample.id!r}: max_length {max_length} cuts into its image tokens "
                             f"({len(ids)} tokens with images)")
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask, vision
