"""Shared prompts (lingshu_rl.train.prefix): rows of a GRPO group run their prompt once, and the log-probs,
entropies, loss and gradients equal the per-row forward, for the tiny Qwen2 and the tiny Qwen2.5-VL model (whose
vision tower then runs once per distinct prompt image, not once per row)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lingshu_rl.config import ModelConfig, TrainConfig
from lingshu_rl.grpo.loss import GRPOLoss
from lingshu_rl.train.batch import TokenBatch, collate, with_vision
from lingshu_rl.train.prefix import find_shared_prompts
from lingshu_rl.train.torch_engine import TorchEngine

LOSS = GRPOLoss(clip_low=0.2, clip_high=0.28, kl_coef=0.05, loss_agg="token-mean", entropy_coef=0.01,
                temperature=0.7)


def engines(path: str, **changes: object) -> tuple[TorchEngine, TorchEngine]:
    """The same model twice, sharing prompts and not."""
    cfg = TrainConfig(lr=1e-4, micro_batch_size=64, device="cpu", **changes)  # type: ignore[arg-type]
    return (TorchEngine(path, ModelConfig(), replace(cfg, share_prompts=True)),
            TorchEngine(path, ModelConfig(), replace(cfg, share_prompts=False)))


def grouped_batch(vocab: int) -> TokenBatch:
    """Three groups (prompts of 9, 4 and 13 tokens) of 4, 3 and 2 responses of different lengths, one of them
    empty and one masked out (a truncated response), in mixed order."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (9, 4, 13)]
    rows = [0, 0, 1, 0, 2, 1, 0, 2, 1]
    responses = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 1, 7, 0, 3, 6, 2, 4, 7)]
    batch = collate([prompts[g] for g in rows], responses, pad_id=0)
    mask = batch.response_mask.clone()
    mask[5] = 0
    ref = (torch.randn(batch.input_ids.shape, generator=gen) * 0.1 - 6.5) * mask
    return batch.with_(response_mask=mask, ref_logprobs=ref, advantages=torch.randn(len(rows), generator=gen))


def forward_and_grads(engine: TorchEngine, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, dict, float]:
    logprobs, entropy = engine.forward(batch, LOSS.temperature, True)
    num_tokens, num_seqs = float(batch.response_mask.sum()), float((batch.response_mask.sum(-1) > 0).sum())
    loss, _ = LOSS(logprobs, entropy, batch, num_tokens, num_seqs)
    engine.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in engine.lm.named_parameters() if p.grad is not None}
    return logprobs.detach(), entropy.detach(), grads, float(loss.detach())


def assert_same(shared: TorchEngine, per_row: TorchEngine, batch: TokenBatch) -> None:
    lp_a, ent_a, grads_a, loss_a = forward_and_grads(shared, batch)
    lp_b, ent_b, grads_b, loss_b = forward_and_grads(per_row, batch)
    assert (lp_a - lp_b).abs().max().item() < 1e-5
    assert (ent_a - ent_b).abs().max().item() < 1e-5
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert set(grads_a) == set(grads_b)
    for name in grads_b:
        scale = grads_b[name].abs().max().item() + 1e-8
        assert (grads_a[name] - grads_b[name]).abs().max().item() / scale < 1e-4, name
    assert (lp_b * batch.response_mask).abs().sum() > 0  # something was compared


def test_rows_are_grouped_by_prompt_tokens_and_images() -> None:
    batch = collate([[5, 6, 7], [5, 6, 7], [5, 6], [5, 6, 7], [5, 6, 7]], [[1, 2], [3], [4, 4], [9], []], pad_id=0)
    share = find_shared_prompts(batch.input_ids, batch.attention_mask, batch.prompt_lengths)
    # the empty response runs its last prompt token as its response: its prompt is then [5, 6], as row 2's
    assert share.row_group.tolist() == [0, 0, 1, 0, 1]
    assert share.group_rows.tolist() == [0, 2] and share.starts.tolist() == [3, 3, 2, 3, 2]
    image_a, image_b = (torch.ones(4, 2), torch.tensor([[1, 2, 2]])), (torch.zeros(4, 2), torch.tensor([[1, 2, 2]]))
    share = find_shared_prompts(batch.input_ids, batch.attention_mask, batch.prompt_lengths,
                                [image_a, image_b, image_a, image_a, None])
    assert share.row_group.tolist() == [0, 1, 2, 0, 3]  # same tokens, another image: another prompt


def test_shared_prompts_give_the_per_row_log_probs_and_gradients(tiny: str) -> None:
    shared, per_row = engines(tiny)
    batch = grouped_batch(shared.lm.config.vocab_size)
    groups = find_shared_prompts(batch.input_ids, batch.attention_mask, batch.prompt_lengths).group_rows
    assert len(groups) == 4  # three prompts, and the empty response's row (its prompt less one token) alone
    assert_same(shared, per_row, batch)
    ref_a, ref_b = shared.logprobs(batch, 0.7), per_row.logprobs(batch, 0.7)  # eval mode, no gradients
    assert (ref_a - ref_b).abs().max().item() < 1e-5
    update_a, update_b = shared.update(batch, LOSS), per_row.update(batch, LOSS)
    assert update_a["actor/grad_norm"] == pytest.approx(update_b["actor/grad_norm"], rel=1e-4)
    weights_a, weights_b = shared.weights(), per_row.weights()
    # Adam's first step moves a weight by ~lr whatever its gradient's size: float noise in near-zero gradients
    # shows as a few hundredths of lr (1e-4) in a handful of weights
    assert max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a) < 1e-5


def test_gradient_checkpointing_trains_per_row(tiny: str) -> None:
    """Recomputed layers cannot keep a prompt's cached keys (transformers drops the cache under checkpointing):
    training then runs every row in full, and the result still equals the per-row forward."""
    shared, per_row = engines(tiny, gradient_checkpointing=True)
    batch = grouped_batch(shared.lm.config.vocab_size)
    assert shared._shared_prompts(batch) is None  # training mode
    shared.model.eval()
    assert shared._shared_prompts(batch) is not None  # old / reference log-probs still share
    shared.model.train()
    assert_same(shared, per_row, batch)


def test_vl_rows_share_prompt_images_once_and_equal_the_per_row_forward(tiny_vl: str, tmp_path) -> None:
    from lingshu_rl.data.image_demo import make_image_demo
    from lingshu_rl.data.vision import encode_prompt_with_images, load_image_processor

    shared, per_row = engines(tiny_vl)
    train, _ = make_image_demo(n_train=3, n_heldout=1, cache_dir=tmp_path)
    processor = load_image_processor(tiny_vl)
    encoded = [encode_prompt_with_images(shared.tokenizer, processor, s) for s in train]
    # sample 2 with sample 0's question text but its own image: equal tokens, another prompt
    other_image = encode_prompt_with_images(shared.tokenizer, processor, replace(train[0], images=train[2].images))
    assert other_image[0] == encoded[0][0]
    prompts = [encoded[0], encoded[0], other_image, encoded[1], encoded[0], encoded[1], other_image]
    gen = torch.Generator().manual_seed(1)
    responses = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in (4, 6, 3, 5, 2, 7, 4)]
    batch = with_vision(collate([p for p, _ in prompts], responses, shared.tokenizer.pad_token_id),
                        [v for _, v in prompts])
    batch = batch.with_(ref_logprobs=torch.full(batch.input_ids.shape, -6.0) * batch.response_mask,
                        advantages=torch.randn(len(prompts), generator=gen))
    assert shared._shared_prompts(batch).row_group.tolist() == [0, 0, 1, 2, 0, 2, 1]

    images_seen = []

    def count_images(module, args, kwargs) -> None:
        images_seen.append(len(kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]))

    hook = shared.lm.model.visual.register_forward_pre_hook(count_images, with_kwargs=True)
    try:
        assert_same(shared, per_row, batch)
    finally:
        hook.remove()
    assert images_seen == [3]  # three distinct prompt images through the vision tower, not seven
