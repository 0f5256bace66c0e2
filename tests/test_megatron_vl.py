"""Qwen2.5-VL under megatron (real megatron-core over gloo) against the transformers engine, on the tiny VL model.

The language model is megatron's GPTModel split over the tensor-parallel ranks; the vision tower is replicated and
trained (not frozen here, so its gradients are checked too). The batch mixes rows with one image, two images and
none, responses of uneven length. Step-1 log-probs and every weight after two GRPO updates must equal the torch
engine's within 1e-4; the converter's Hugging Face -> megatron -> Hugging Face round trip is bit-identical; the
launcher runs the demo-vl recipe (SFT warm-up, GRPO, evaluation) with the megatron engine at TP=2.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from lingshu_rl.config import ModelConfig, TrainConfig
from lingshu_rl.launch.ray_cluster import init_local_ray

pytestmark = [pytest.mark.slow, pytest.mark.skipif(find_spec("megatron") is None or find_spec("megatron.core") is None,
                                                   reason="megatron-core is not installed")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from lingshu_rl.models.tiny_vl import build_tiny_vl_model

    return str(build_tiny_vl_model(tmp_path_factory.mktemp("cache")))


def train_cfg(**changes) -> TrainConfig:
    return TrainConfig(lr=1e-3, micro_batch_size=2, max_grad_norm=1.0, threads=1, **changes)


def image_batch(model_dir: str, images_dir: Path):
    """Six rows: four with one image, one with two, one text-only; random responses of 3 to 12 tokens."""
    from transformers import AutoTokenizer

    from lingshu_rl.data.image_demo import make_image_demo
    from lingshu_rl.data.vision import encode_prompt_with_images, load_image_processor
    from lingshu_rl.train.batch import collate, with_vision

    train, _ = make_image_demo(n_train=6, n_heldout=1, cache_dir=images_dir)
    train[4] = replace(train[4], images=[train[4].images[0], train[5].images[0]])
    train[5] = replace(train[5], images=[])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts, visions = zip(*(encode_prompt_with_images(tokenizer, load_image_processor(model_dir), s) for s in train))
    gen = torch.Generator().manual_seed(0)
    responses = [torch.randint(3, 600, (int(n),), generator=gen).tolist() for n in torch.randint(3, 13, (6,),
                                                                                                  generator=gen)]
    batch = collate(list(prompts), responses, tokenizer.pad_token_id).with_(advantages=torch.randn(6, generator=gen))
    return with_vision(batch, list(visions))


@pytest.fixture(scope="module")
def reference(model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """The torch engine's step-1 log-probs and weights after two updates on the image batch."""
    import ray
    from conftest import torch_engine_reference

    batch = image_batch(model_dir, tmp_path_factory.mktemp("images"))
    assert batch.image_counts.tolist() == [1, 1, 1, 1, 2, 0]
    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ref = torch_engine_reference(model_dir, batch, train_cfg())
    logprobs, initial, weights, updated = ref["logprobs"], ref["initial"], ref["weights"], ref["updated"]
    moved = {k: float((weights[k] - initial[k]).abs().max()) for k in weights}
    assert min(v for k, v in moved.items() if k.startswith("model.visual.")) > 1e-3  # the tower trains too
    yield batch, logprobs, weights, updated
    ray.shutdown()


@pytest.mark.parametrize("dp, tp, sequence_parallel", [(1, 2, False), (2, 2, False), (1, 2, True)])
def test_vision_language_model_under_megatron_matches_torch_engine(model_dir: str, reference, dp: int, tp: int,
                                                                   sequence_parallel: bool) -> None:
    import ray

    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.train.group import PolicyGroup

    batch, logprobs, weights, updated = reference
    cfg = train_cfg(engine="megatron", data_parallel_size=dp, tensor_parallel_size=tp,
                    sequence_parallel=sequence_parallel)
    group = PolicyGroup.start(lambda rank: {"num_cpus": 0}, model_dir, ModelConfig(), cfg, 4, True, 0, 1)
    try:
        got = ray.get(group.logprobs.remote(batch, 0.7))
        assert float((got - logprobs).abs().max()) < 1e-4
        for _ in range(2):
            assert ray.get(group.update.remote(batch, GRPOLoss(temperature=0.7)))["actor/nan_skipped"] == 0
        after = ray.get(group.weights.remote())
        assert sorted(after) == sorted(weights)  # the transformers engine's names, the vision tower's included
        worst = max(float((after[k] - weights[k]).abs().max()) for k in weights)
        assert worst < 1e-4, worst
        # the export shows rank 0's replicated tower; every rank's forward uses its own copy, so a copy that drifted
        # on another rank would show in the updated model's log-probs
        assert float((ray.get(group.logprobs.remote(batch, 0.7)) - updated).abs().max()) < 1e-4
    finally:
        group.kill()


def test_a_replica_that_sees_no_image_sums_the_tower_gradients_as_zero(model_dir: str, reference,
                                                                        tmp_path: Path) -> None:
    """DP=2: replica 1's rows are text-only, so its vision tower gets no gradient. The replicas sum gradients tensor
    by tensor (to each tensor's owner): the tower's must count as zero there, not be skipped, or every later sum
    pairs the wrong tensors."""
    import ray
    from conftest import image_and_text_batch, torch_engine_reference

    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.train.group import PolicyGroup

    batch = image_and_text_batch(model_dir, tmp_path)
    weights = torch_engine_reference(model_dir, batch, train_cfg())["weights"]
    group = PolicyGroup.start(lambda rank: {"num_cpus": 0}, model_dir, ModelConfig(),
                              train_cfg(engine="megatron", data_parallel_size=2), 4, True, 0, 1)
    try:
        for _ in range(2):
            ray.get(group.update.remote(batch, GRPOLoss(temperature=0.7)), timeout=120)
        after = ray.get(group.weights.remote())
    finally:
        group.kill()
    assert max(float((after[k] - weights[k]).abs().max()) for k in weights) < 1e-4


def test_freezing_the_vision_tower_by_its_hugging_face_names(model_dir: str, reference) -> None:
    import ray

    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.train.group import PolicyGroup

    batch = reference[0]
    cfg = train_cfg(engine="megatron", tensor_parallel_size=2, freeze=["model.visual.*"])
    group = PolicyGroup.start(lambda rank: {"num_cpus": 0}, model_dir, ModelConfig(), cfg, 4, True, 0, 1)
    try:
        before = ray.get(group.weights.remote())
        ray.get(group.update.remote(batch, GRPOLoss(temperature=0.7)))
        after = ray.get(group.weights.remote())
    finally:
        group.kill()
    tower = [k for k in before if k.startswith("model.visual.")]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert not torch.equal(before["model.language_model.layers.0.mlp.up_proj.weight"],
                           after["model.language_model.layers.0.mlp.up_proj.weight"])


def test_vl_checkpoint_round_trip_through_megatron_shards_is_bit_identical(model_dir: str) -> None:
    from transformers import AutoConfig

    from lingshu_rl.models.hf import load_model
    from lingshu_rl.train.megatron.convert import GPTSpec, canonical_name, hf_to_megatron, megatron_to_hf
    from lingshu_rl.train.megatron.engine import HFCheckpoint

    expected = load_model(model_dir, torch.float32, False).state_dict()  # transformers' names
    for tp in (1, 2, 4):
        spec = GPTSpec.from_hf(AutoConfig.from_pretrained(model_dir), tp)
        assert spec.vision and spec.mrope_section == (4, 6, 6)
        stored = HFCheckpoint(model_dir, rename=lambda name, spec=spec: canonical_name(name, spec))
        shards = [hf_to_megatron(stored, spec, r) for r in range(tp)]
        assert all(torch.equal(s["visual.merger.mlp.0.weight"], shards[0]["visual.merger.mlp.0.weight"])
                   for s in shards)  # replicated
        back = megatron_to_hf(shards, spec)
        assert set(back) == set(expected)
        for name, tensor in expected.items():
            assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_demo_vl_recipe_runs_with_megatron_tensor_parallel(tmp_path: Path) -> None:
    out = tmp_path / "run"
    sets = ["train.engine=megatron", "train.tensor_parallel_size=2", "sft.stages.0.steps=3", "grpo.steps=2",
            "grpo.prompts_per_step=2", "rollout.n=2", "eval.limit=4", "logging.wandb.mode=disabled",
            "cluster.include_dashboard=false"]
    args = [sys.executable, "-m", "lingshu_rl.launch", "--preset", "demo-vl", "--reward", "mcq_exact",
            "--output-dir", str(out)]
    for item in sets:
        args += ["--set", item]
    proc = subprocess.run(args, env={**os.environ, "LINGSHU_CACHE": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for stage in (out / "sft" / "warmup", out / "checkpoints" / "step_000002"):
        assert (stage / "model" / "preprocessor_config.json").is_file()  # the processor travels
    assert (out / "checkpoints" / "step_000002" / "megatron" / "optimizer_tp1.pt").is_file()
    comparison = json.loads((out / "eval" / "comparison.json").read_text())
    assert set(comparison["benchmarks"]["image_demo"]) == {"base", "sft", "grpo"}
