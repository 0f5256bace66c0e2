"""The tensor batch the training engines consume."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, cast

import torch
from torch import Tensor

from lingshu_rl.data.vision import VisionInputs, merge_vision, stack_vision

_VISION = ("pixel_values", "image_grid_thw", "image_counts")


@dataclass
class TokenBatch:
    """N sequences of prompt + response tokens, right-padded to length T.

    Per-token tensors are aligned with ``input_ids``; ``response_mask`` is 1 on the tokens being learnt.
    """

    input_ids: Tensor  # [N, T] long
    attention_mask: Tensor  # [N, T] long, 1 on real tokens
    response_mask: Tensor  # [N, T] float, 1 on response tokens
    advantages: Tensor | None = None  # [N] GRPO advantage per sequence
    old_logprobs: Tensor | None = None  # [N, T] policy log-probs before the update (None: on-policy, use current)
    ref_logprobs: Tensor | None = None  # [N, T] reference-policy log-probs for the KL term
    rollout_logprobs: Tensor | None = None  # [N, T] the rollout engine's sampling log-probs (mismatch metric, TIS)
    segment_ids: Tensor | None = None  # [N, T] packed rows: 1, 2, ... per packed sample, 0 on padding
    position_ids: Tensor | None = None  # [N, T] packed rows: positions restart at 0 for every packed sample
    prompt_lengths: Tensor | None = None  # [N] long: rows of prompt + response (collate); rows sharing a prompt
    #   run it once in the forward (lingshu_rl.train.prefix)
    # images (vision-language models): every image's patches and grid, rows in order; image_counts [N] says how
    # many images each row has (see lingshu_rl.data.vision)
    pixel_values: Tensor | None = None  # [patches, dim]
    image_grid_thw: Tensor | None = None  # [images, 3]
    image_counts: Tensor | None = None  # [N] long
    # or, before they reach a training rank: each row's images still in Ray's object store (an ObjectRef of its
    # VisionInputs, or None), fetched by the rank itself (lingshu_rl.train.group); the driver never holds pixels
    vision_refs: list[Any] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: slice | Tensor) -> TokenBatch:
        """Rows ``index`` of every tensor, trimmed to the longest remaining sequence (images follow their rows)."""
        skip = (*_VISION, "vision_refs")
        picked: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        picked = {k: (v[index] if v is not None else None) for k, v in picked.items()}
        length = int(picked["attention_mask"].sum(dim=1).max().item()) if len(picked["input_ids"]) else 0
        trimmed = {k: (v[:, :length] if v is not None and v.dim() == 2 else v) for k, v in picked.items()}
        refs = None if self.vision_refs is None else [self.vision_refs[i] for i in torch.arange(len(self))[index]]
        return TokenBatch(**trimmed, **self._select_images(index), vision_refs=refs)

    def _select_images(self, index: slice | Tensor) -> dict[str, Tensor]:
        if self.image_counts is None:
            return {}
        assert self.image_grid_thw is not None and self.pixel_values is not None  # images come with all three
        rows = torch.arange(len(self))[index].tolist()
        first_image = torch.cumsum(self.image_counts, 0) - self.image_counts
        patches = self.image_grid_thw.prod(dim=-1)
        first_patch = torch.cumsum(patches, 0) - patches
        images = [i for r in rows for i in range(int(first_image[r]), int(first_image[r] + self.image_counts[r]))]
        if not images:  # text-only rows: no image inputs at all (an empty pixel tensor would reach the vision tower)
            return {}
        patch_rows = [torch.arange(int(first_patch[i]), int(first_patch[i] + patches[i])) for i in images]
        return {"pixel_values": self.pixel_values[torch.cat(patch_rows)],
                "image_grid_thw": self.image_grid_thw[images], "image_counts": self.image_counts[index]}

    def chunks(self, size: int) -> list[TokenBatch]:
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    def with_(self, **changes: Tensor | list[Any] | None) -> TokenBatch:
        return replace(self, **cast(dict[str, Any], changes))  # None only ever goes to the optional fields


def loss_totals(batch: TokenBatch) -> tuple[float, float]:
    """``(num_tokens, num_seqs)`` of a whole update, the divisors of the loss aggregation: the response tokens
    learnt from, and the sequences with at least one of them. A sequence whose mask was zeroed (e.g. a truncated
    response under ``grpo.mask_truncated``) adds nothing to the loss, so it is not counted either: it would
    only dilute the sequence-level means. Both are at least 1 (an all-masked update has loss 0)."""
    per_seq = batch.response_mask.sum(dim=-1)
    return float(per_seq.sum().clamp(min=1)), float((per_seq > 0).sum().clamp(min=1))


def with_vision(batch: TokenBatch, rows: Sequence[VisionInputs | None]) -> TokenBatch:
    """``batch`` with the images of its rows attached (unchanged when no row has images)."""
    stacked = stack_vision(list(rows))
    if stacked is None:
        return batch
    pixel_values, image_grid_thw, image_counts = stacked
    return batch.with_(pixel_values=pixel_values, image_grid_thw=image_grid_thw, image_counts=image_counts)


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> TokenBatch:
    """Concatenate prompt and response token ids per sequence and right-pad them into a batch."""
    batch = collate_masked([([*p, *r], [0] * len(p) + [1] * len(r)) for p, r in zip(prompts, responses)], pad_id)
    return batch.with_(prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long))


def collate_masked(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> TokenBatch:
    """Right-pad ``(token ids, loss mask)`` pairs into a batch."""
    length = max(len(ids) for ids, _ in sequences)
    n = len(sequences)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    response_mask = torch.zeros((n, length), dtype=torch.float32)
    for i, (ids, mask) in enumerate(sequences):
        input_ids[i, :len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[i, :len(ids)] = 1
        response_mask[i, :len(ids)] = torch.tensor(list(mask), dtype=torch.float32)
    return TokenBatch(input_ids, attention_mask, response_mask)


def pack(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int, pad_id: int,
         visions: Sequence[VisionInputs | None] | None = None) -> TokenBatch:
    """Pack ``(ids, mask)`` sequences into rows of at most ``max_length`` tokens (first fit, in order).

    Each packed sample gets its own segment id and positions restarting at 0; the engine turns segments into
    a block-diagonal causal attention mask, so packed samples never see each other. ``visions[i]`` are sequence
    i's images; they follow it into its row.
    """
    rows: list[list[tuple[Sequence[int], Sequence[int]]]] = []
    row_visions: list[list[VisionInputs | None]] = []
    room: list[int] = []
    for i, (ids, mask) in enumerate(sequences):
        if len(ids) > max_length:
            raise ValueError(f"a sequence of {len(ids)} tokens does not fit max_length {max_length}")
        slot = next((r for r, free in enumerate(room) if free >= len(ids)), None)
        if slot is None:
            rows.append([])
            row_visions.append([])
            room.append(max_length)
            slot = len(rows) - 1
        rows[slot].append((ids, mask))
        row_visions[slot].append(visions[i] if visions else None)
        room[slot] -= len(ids)
    flat = [([t for ids, _ in row for t in ids], [m for _, mask in row for m in mask]) for row in rows]
    batch = collate_masked(flat, pad_id)
    segments = torch.zeros_like(batch.input_ids)
    positions = torch.zeros_like(batch.input_ids)
    for r, row in enumerate(rows):
        start = 0
        for k, (ids, _) in enumerate(row, start=1):
            segments[r, start:start + len(ids)] = k
            positions[r, start:start + len(ids)] = torch.arange(len(ids))
            start += len(ids)
    batch = batch.with_(segment_ids=segments, position_ids=positions)
    return with_vision(batch, [merge_vision(row) for row in row_visions])


def response_values(prompt_lengths: Sequence[int], values: Sequence[Sequence[float]], length: int) -> Tensor:
    """Per-response-token values (e.g. sampling log-probs) at their tokens' positions in a :func:`collate` batch:
    row i holds ``values[i]`` from position ``prompt_lengths[i]`` on, zeros elsewhere. ``[N, length]``."""
    out = torch.zeros((len(values), length), dtype=torch.float32)
    for i, (start, row) in enumerate(zip(prompt_lengths, values)):
        out[i, start:start + len(row)] = torch.tensor(list(row), dtype=torch.float32)
    return out
