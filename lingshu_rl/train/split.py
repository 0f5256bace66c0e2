"""How one update's batch is cut: into optimiser updates (mini-batches), then across data-parallel ranks.

Every rank gets a near-equal share of tokens (not of rows: a long response costs what several short ones do);
GRPO rows that share a prompt go to one rank together, which then runs the prompt once for all of them
(:mod:`lingshu_rl.train.prefix`). The loss of every micro-batch is normalised by totals over the whole update
on all ranks, so the summed gradient at DP=k equals the gradient at DP=1 (up to float error) for every
``loss_agg`` mode.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from lingshu_rl.train.batch import TokenBatch, loss_totals
from lingshu_rl.train.prefix import find_shared_prompts


@dataclass
class MiniBatch:
    """One rank's part of one optimiser update."""

    batch: TokenBatch  # this rank's rows (may be empty of learnable tokens: then a zero-mask placeholder row)
    num_tokens: float  # learnable tokens of the whole update, all ranks
    num_seqs: float  # sequences with at least one learnable token in the whole update, all ranks
    micro_batches: int  # micro-batches every rank runs for this update (ranks with fewer rows repeat a blank one)


def balanced_shards(token_counts: list[int], parts: int) -> list[list[int]]:
    """Row indices for ``parts`` shards of near-equal token totals: the longest row first, each into the shard
    holding the fewest tokens so far (ties: fewest rows). Indices within a shard are in ascending order."""
    heap = [(0, 0, p) for p in range(parts)]  # (tokens, rows, shard)
    shards: list[list[int]] = [[] for _ in range(parts)]
    for index in sorted(range(len(token_counts)), key=lambda i: (-token_counts[i], i)):
        tokens, rows, part = heapq.heappop(heap)
        shards[part].append(index)
        heapq.heappush(heap, (tokens + token_counts[index], rows + 1, part))
    return [sorted(s) for s in shards]


def blank_row(batch: TokenBatch) -> TokenBatch:
    """Row 0 of ``batch`` with nothing to learn: a rank with no rows left still runs the forward and backward
    passes its peers' collectives (FSDP all-gathers and reduce-scatters) wait for, and adds zero."""
    row = batch.select(slice(0, 1))
    return row.with_(response_mask=torch.zeros_like(row.response_mask))


def plan_updates(batch: TokenBatch, updates: int, dp_size: int, micro_batch_size: int) -> list[list[MiniBatch]]:
    """``plan[rank][u]``: rank ``rank``'s part of optimiser update ``u``.

    The batch is first cut into ``updates`` consecutive mini-batches (as at DP=1), then each mini-batch is
    dealt to the ranks by token count.
    """
    mini_size = math.ceil(len(batch) / updates)
    plan: list[list[MiniBatch]] = [[] for _ in range(dp_size)]
    for mini in batch.chunks(mini_size):
        num_tokens, num_seqs = loss_totals(mini)
        shards = _deal(mini, dp_size)
        micro_batches = max(1, max(math.ceil(len(s) / micro_batch_size) for s in shards))
        for rank, rows in enumerate(shards):
            part = mini.select(torch.tensor(rows, dtype=torch.long)) if rows else blank_row(mini)
            plan[rank].append(MiniBatch(part, num_tokens, num_seqs, micro_batches))
    return plan


def _deal(batch: TokenBatch, parts: int) -> list[list[int]]:
    """Rows per rank: whole prompt groups by the tokens they cost (the prompt once, every response), where the
    batch has at least one group per rank; otherwise rows by their tokens."""
    lengths = batch.attention_mask.sum(dim=1)
    if batch.prompt_lengths is not None and batch.segment_ids is None:
        share = find_shared_prompts(batch.input_ids, batch.attention_mask, batch.prompt_lengths)
        if len(share.group_rows) >= parts:
            members: list[list[int]] = [[] for _ in share.group_rows]
            for row, group in enumerate(share.row_group.tolist()):
                members[group].append(row)
            costs = [int(share.starts[rows[0]]) + int((lengths[rows] - share.starts[rows]).sum()) for rows in members]
            return [sorted(r for g in groups for r in members[g]) for groups in balanced_shards(costs, parts)]
    return balanced_shards(lengths.tolist(), parts)
