"""SFT building blocks on the real tiny model: assistant-only masks, packing, freezing, data mixing."""

import dataclasses

import pytest
import torch
from transformers import AutoTokenizer

from lingshu_rl.config import ModelConfig, SFTSourceConfig, SFTStageConfig, TrainConfig
from lingshu_rl.data.chat import encode_conversation
from lingshu_rl.data.sample import Sample
from lingshu_rl.models.tiny import build_tiny_model
from lingshu_rl.sft.data import plan_steps
from lingshu_rl.train.batch import collate_masked, pack
from lingshu_rl.train.losses import SFTLoss
from lingshu_rl.train.torch_engine import TorchEngine


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(build_tiny_model())


@pytest.fixture(scope="module")
def tokenizer(model_dir: str):
    return AutoTokenizer.from_pretrained(model_dir)


def conversation(i: int, turns: int = 2) -> Sample:
    messages = [{"role": "system", "content": "You are a medical assistant."}]
    for t in range(turns):
        messages += [{"role": "user", "content": f"Which drug is first-line for anaphylaxis? ({i}.{t})"},
                     {"role": "assistant", "content": f"<answer>{['epinephrine', 'naloxone'][t % 2]}</answer>"}]
    return Sample(id=str(i), messages=messages, answer="")


def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer) -> None:
    ids, mask = encode_conversation(tokenizer, conversation(0, turns=2))
    learnt = [ids[i] for i in range(len(ids)) if mask[i]]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # both assistant answers, each followed by its end-of-turn token, and nothing else
    expected = []
    for answer in ("<answer>epinephrine</answer>", "<answer>naloxone</answer>"):
        expected += tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
    assert learnt == expected
    text_of_learnt = tokenizer.decode(learnt)
    assert "anaphylaxis" not in text_of_learnt and "medical assistant" not in text_of_learnt
    assert "assistant" not in text_of_learnt  # the template's role header is not learnt
    assert mask[0] == 0 and len(ids) == len(mask)


def test_conversation_without_assistant_turn_is_rejected(tokenizer) -> None:
    sample = Sample(id="q7", messages=[{"role": "user", "content": "hi"}], answer="")
    with pytest.raises(ValueError, match="'q7' has no assistant message"):
        encode_conversation(tokenizer, sample)


def test_packed_batch_gives_the_unpacked_loss_and_gradients(model_dir: str, tokenizer) -> None:
    rows = [encode_conversation(tokenizer, conversation(i, turns=1 + i % 2)) for i in range(6)]
    pad = tokenizer.pad_token_id
    packed = pack(rows, max_length=160, pad_id=pad)
    assert len(packed) < len(rows) and int(packed.segment_ids.max()) >= 2  # several samples share a row
    engine = TorchEngine(model_dir, ModelConfig(), TrainConfig(lr=1e-3, micro_batch_size=2), total_steps=1)
    results = []
    for batch in (collate_masked(rows, pad), packed):
        engine.model.zero_grad()
        num_tokens = float(batch.response_mask.sum())
        logprobs = engine.forward(batch, 1.0, False)[0]
        loss, _ = SFTLoss()(logprobs, None, batch, num_tokens, float(len(batch)))
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in engine.lm.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    for name, grad in grads_a.items():
        assert torch.allclose(grads_b[name], grad, rtol=1e-4, atol=1e-7), name
    # and through the engine's own update path (micro-batched, clipped): the same loss and gradient norm
    metrics = [TorchEngine(model_dir, ModelConfig(), TrainConfig(micro_batch_size=2)).update(b, SFTLoss())
               for b in (collate_masked(rows, pad), packed)]
    assert metrics[1]["sft/loss"] == pytest.approx(metrics[0]["sft/loss"], rel=1e-5)
    assert metrics[1]["actor/grad_norm"] == pytest.approx(metrics[0]["actor/grad_norm"], rel=1e-4)


def test_packing_without_segments_would_leak(model_dir: str, tokenizer) -> None:
    """The check above is meaningful: the same packed rows with an ordinary mask give another loss."""
    rows = [encode_conversation(tokenizer, conversation(i)) for i in range(4)]
    packed = pack(rows, max_length=200, pad_id=tokenizer.pad_token_id)
    engine = TorchEngine(model_dir, ModelConfig(), TrainConfig(), trainable=False)
    isolated = engine.logprobs(collate_masked(rows, tokenizer.pad_token_id))
    leaky = packed.with_(segment_ids=None, position_ids=None)
    assert (isolated.sum() - engine.logprobs(packed).sum()).abs() < 1e-3
    assert (isolated.sum() - engine.logprobs(leaky).sum()).abs() > 1e-3


def test_frozen_parameters_do_not_move(model_dir: str, tokenizer) -> None:
    cfg = TrainConfig(lr=1e-2, freeze=["model.embed_tokens.*", "model.layers.0.*"],
                      lr_groups={"model.layers.3.*": 1e-4})
    engine = TorchEngine(model_dir, ModelConfig(), cfg, total_steps=1)
    before = {n: p.detach().clone() for n, p in engine.lm.named_parameters()}
    engine.update(collate_masked([encode_conversation(tokenizer, conversation(1))], tokenizer.pad_token_id), SFTLoss())
    after = dict(engine.lm.named_parameters())
    for name, value in before.items():
        moved = not torch.equal(value, after[name].detach())
        frozen = name.startswith(("model.embed_tokens.", "model.layers.0."))
        assert moved != frozen, name
    lrs = sorted(g["lr"] for g in engine.optimizer.param_groups)
    assert lrs == [1e-4, 1e-2]
    with pytest.raises(ValueError, match="freeze patterns match no parameter: \\['vision_tower.\\*'\\]"):
        TorchEngine(model_dir, ModelConfig(), dataclasses.replace(cfg, freeze=["vision_tower.*"]))


def test_mixing_by_epochs_and_weights() -> None:
    a = [Sample(id=f"a{i}", messages=[], answer="") for i in range(10)]
    b = [Sample(id=f"b{i}", messages=[], answer="") for i in range(4)]
    stage = SFTStageConfig(name="mix", data=[SFTSourceConfig("a", epochs=0.5), SFTSourceConfig("b", epochs=2)],
                           batch_size=3)
    plan = plan_steps(stage, [a, b], seed=0)
    ids = [s.id for step in plan for s in step]
    assert len(plan) == 5  # (5 + 8) samples / 3 per step, rounded up (the last step wraps around)
    assert sum(i.startswith("b") for i in ids[:13]) == 8 and len({i for i in ids[:13] if i.startswith("a")}) == 5
    assert plan_steps(stage, [a, b], seed=0) == plan  # fixed in advance: a resumed stage continues exactly
    weighted = dataclasses.replace(stage, steps=200, data=[SFTSourceConfig("a", weight=3.0),
                                                           SFTSourceConfig("b", weight=1.0)])
    drawn = [s.id[0] for step in plan_steps(weighted, [a, b], seed=0) for s in step]
    assert 0.70 < drawn.count("a") / len(drawn) < 0.80
    with pytest.raises(ValueError, match="needs a weight on every source and stage steps > 0"):
        plan_steps(dataclasses.replace(weighted, steps=0), [a, b], seed=0)
