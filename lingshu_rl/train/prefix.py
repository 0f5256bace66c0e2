"""Shared prompts: the n responses of a GRPO group share one prompt, so the prompt runs through the model once
per group and its keys and values serve every response of the group.

A row of a GRPO batch is ``prompt + response`` (right-padded). Where rows of a micro-batch share a prompt (the
same tokens, the same images), the forward runs in two passes over the same layers:

1. the prompt pass: one row per group, up to the prompt's end, keeping each layer's keys and values;
2. the response pass: every row's response, attending to its group's cached prompt keys and values.

Positions, masks and the arithmetic of attention are those of the full forward, so log-probs and gradients
equal the per-row computation up to float error (tested), and the prompt costs 1/n of its FLOPs and
activations. Medical GRPO prompts (a vignette, options, an image) are long beside their answers: there the
prompt is most of the tokens. The last prompt position's hidden state predicts the first response token; it
comes from the prompt pass, shared by the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache


@dataclass(frozen=True)
class SharedPrompts:
    """Which rows of a micro-batch share a prompt.

    ``starts[i]``: the first position of row i after the shared part (its first response token);
    ``lengths[i]``: row i's real tokens; ``row_group[i]``: its group; ``group_rows[g]``: a row holding group g's
    prompt (the prompt pass runs on these rows).
    """

    starts: Tensor  # [N] long
    lengths: Tensor  # [N] long
    row_group: Tensor  # [N] long
    group_rows: Tensor  # [G] long


def find_shared_prompts(input_ids: Tensor, attention_mask: Tensor, prompt_lengths: Tensor,
                        images: list[tuple[Tensor, Tensor] | None] | None = None,
                        device: torch.device | None = None) -> SharedPrompts:
    """Group right-padded rows by their prompt: the tokens up to ``prompt_lengths`` and, for vision-language
    rows, ``images[i]`` (the row's pixels and image grid; equal tokens with other images are another prompt).
    A row whose response is empty keeps its last token out of the prompt (the response pass always has one)."""
    lengths = attention_mask.sum(dim=-1).long().cpu()
    starts = torch.minimum(prompt_lengths.long().cpu(), lengths - 1).clamp(min=1)
    by_tokens: dict[tuple, list[int]] = {}  # prompt tokens -> the groups with them (one per distinct image set)
    row_group: list[int] = []
    group_rows: list[int] = []
    for row, (ids, start) in enumerate(zip(input_ids.cpu().tolist(), starts.tolist())):
        candidates = by_tokens.setdefault((start, *ids[:start]), [])
        same = [g for g in candidates if images is None or _equal(images[group_rows[g]], images[row])]
        if not same:
            candidates.append(len(group_rows))
            group_rows.append(row)
        row_group.append(same[0] if same else candidates[-1])
    device = device or input_ids.device
    return SharedPrompts(starts.to(device), lengths.to(device), torch.tensor(row_group, device=device),
                         torch.tensor(group_rows, device=device))


def _equal(a: tuple[Tensor, Tensor] | None, b: tuple[Tensor, Tensor] | None) -> bool:
    if a is None or b is None:
        return a is b
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def shared_prompt_forward(base: torch.nn.Module, input_ids: Tensor, positions: Tensor, share: SharedPrompts,
                          vision: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``base`` (a Hugging Face base model) in the two passes above.

    ``positions``: every row's position ids as in the full forward (``[N, T]``, or ``[3, N, T]`` for Qwen2-VL's
    rotary positions); ``vision``: the pixel inputs of the ``group_rows`` (prompt pass only).
    Returns ``(hidden, index, valid)``: ``hidden`` ``[N, 1 + R, H]`` holds, for each row, the final hidden states
    at positions ``index`` ``[N, 1 + R]`` (its last prompt position, then its response), real where ``valid``.
    """
    starts, lengths, row_group, group_rows = share.starts, share.lengths, share.row_group, share.group_rows
    width = input_ids.shape[1]
    device = input_ids.device
    prompt_len = int(starts[group_rows].max())
    prompt_mask = (torch.arange(prompt_len, device=device)[None] < starts[group_rows, None]).long()  # [G, P]
    cache = DynamicCache()
    prompt_hidden = base(input_ids=input_ids[group_rows, :prompt_len], attention_mask=prompt_mask,
                         position_ids=positions[..., group_rows, :prompt_len], past_key_values=cache,
                         use_cache=True, **vision).last_hidden_state  # [G, P, H]
    # each row gets its group's keys and values (an index_select: gradients flow back to the prompt pass)
    cache.reorder_cache(cast(torch.LongTensor, row_group))

    rest = max(int((lengths - starts).max()), 1)
    index = starts[:, None] - 1 + torch.arange(rest + 1, device=device)[None]  # [N, 1 + R]: last prompt, response
    valid = index < lengths[:, None]
    index = index.clamp(max=width - 1)
    response_index = index[:, 1:]
    response_positions = positions.gather(-1, response_index.expand(*positions.shape[:-1], -1))
    mask = torch.cat([prompt_mask[row_group], valid[:, 1:].long()], dim=1)  # [N, P + R]
    response_hidden = base(input_ids=input_ids.gather(1, response_index), attention_mask=mask,
                           position_ids=response_positions, past_key_values=cache, use_cache=True).last_hidden_state
    last_prompt = prompt_hidden[row_group, starts - 1]  # [N, H]: predicts each row's first response token
    return torch.cat([last_prompt[:, None], response_hidden], dim=1), index, valid
