"""Images through data reading, SFT encoding and the training engine, on the tiny Qwen2.5-VL model and the
generated image demo: images change the engine's log-probs, micro-batching splits images with their rows,
a frozen vision tower stays bit-identical through an SFT update, and a bad image path names sample and path."""

import json
from pathlib import Path

import pytest
import torch

from lingshu_rl.config import ModelConfig, TrainConfig
from lingshu_rl.data.image_demo import make_image_demo
from lingshu_rl.data.readers import DataError, read_samples
from lingshu_rl.data.vision import (
    ImageError, compact_image_pads, encode_conversation_with_images, encode_prompt_with_images, load_image,
    load_image_processor)
from lingshu_rl.data.demo import demo_sft_sample
from lingshu_rl.train.batch import collate, collate_masked, with_vision
from lingshu_rl.train.losses import SFTLoss
from lingshu_rl.train.torch_engine import TorchEngine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from lingshu_rl.models.tiny_vl import build_tiny_vl_model

    return str(build_tiny_vl_model(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_image_demo(n_train=16, n_heldout=4, cache_dir=tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def engine(model_dir: str) -> TorchEngine:
    return TorchEngine(model_dir, ModelConfig(), TrainConfig(lr=1e-3, micro_batch_size=2, freeze=["model.visual.*"]))


def test_image_tokens_are_expanded_per_image_and_compact_for_vllm(model_dir: str, demo) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = load_image_processor(model_dir)
    ids, vision = encode_prompt_with_images(tokenizer, processor, demo[0][0])
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert vision.image_grid_thw.tolist() == [[1, 4, 4]] and ids.count(pad) == 4  # 56x56: 2x2 merged tokens
    assert compact_image_pads(ids, pad).count(pad) == 1
    full, mask, _ = encode_conversation_with_images(tokenizer, processor, demo_sft_sample(demo[0][0]))
    assert full[:len(ids)] == ids and not any(m for t, m in zip(full, mask) if t == pad)
    assert tokenizer.decode([t for t, m in zip(full, mask) if m]).startswith("<answer>")


def _batch(engine: TorchEngine, samples, response: str):
    processor = load_image_processor(engine.model_path)
    prompts, visions = zip(*(encode_prompt_with_images(engine.tokenizer, processor, s) for s in samples))
    responses = [engine.tokenizer(response)["input_ids"]] * len(samples)
    return with_vision(collate(list(prompts), responses, engine.tokenizer.pad_token_id), list(visions))


def test_images_change_logprobs_and_micro_batches_keep_them_with_their_rows(engine: TorchEngine, demo) -> None:
    train, _ = demo
    a, b = train[0], train[1]
    b_with_a_text = type(b)(**{**b.__dict__, "messages": a.messages})  # same text, another image
    batch = _batch(engine, [a, b_with_a_text, a], "<answer>upper left</answer>")
    engine.cfg.micro_batch_size = 1
    one_by_one = engine.logprobs(batch)
    engine.cfg.micro_batch_size = 3
    together = engine.logprobs(batch)
    engine.cfg.micro_batch_size = 2
    assert torch.allclose(one_by_one, together, atol=1e-5)
    assert torch.allclose(together[0], together[2], atol=1e-6)  # same image and text, same log-probs
    assert (together[0] - together[1]).abs().max() > 1e-3  # only the image differs


def test_sft_update_with_images_freezes_the_vision_tower(engine: TorchEngine, demo) -> None:
    processor = load_image_processor(engine.model_path)
    rows = [encode_conversation_with_images(engine.tokenizer, processor, demo_sft_sample(s)) for s in demo[0][:4]]
    batch = with_vision(collate_masked([(i, m) for i, m, _ in rows], engine.tokenizer.pad_token_id),
                        [v for _, _, v in rows])
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    metrics = engine.update(batch, SFTLoss())
    assert torch.isfinite(torch.tensor(metrics["sft/loss"])) and metrics["actor/nan_skipped"] == 0
    after = dict(engine.model.named_parameters())
    visual = [n for n in before if n.startswith("model.visual.")]
    assert visual and all(torch.equal(before[n], after[n]) for n in visual)
    assert not torch.equal(before["model.language_model.layers.0.mlp.up_proj.weight"],
                           after["model.language_model.layers.0.mlp.up_proj.weight"])


def test_a_bad_image_path_names_the_sample_and_the_path(tmp_path: Path, demo) -> None:
    good = demo[0][0].images[0]
    rows = [{"id": "ok", "prompt": "Where?", "answer": "A", "images": [good]},
            {"id": "scan-17", "prompt": "Where?", "answer": "A", "images": ["scans/missing.png"]}]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        read_samples(data)
    assert "'scan-17'" in str(err.value) and str(tmp_path / "scans" / "missing.png") in str(err.value)
    assert [s.id for s in read_samples(data, skip_missing_images=True)] == ["ok"]
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "missing.png").write_text("not an image")
    broken = read_samples(data)[1]
    with pytest.raises(ImageError, match="sample 'scan-17': cannot read image .*missing.png"):
        load_image(broken.images[0], broken.id)
