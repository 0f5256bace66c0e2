"""FSDP2 data parallelism over gloo: two Ray rank actors against one process, with the real tiny models.

An update at DP=2 (the batch dealt by tokens, uneven micro-batch counts per rank, the loss normalised over both
ranks) must equal the update at DP=1 in loss, gradient norm and every parameter; a sharded checkpoint written at
one size resumes at the other; float32 master weights keep updates a bf16 copy would round away.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lingshu_rl.config import ModelConfig, TrainConfig
from lingshu_rl.grpo.loss import GRPOLoss
from lingshu_rl.launch.ray_cluster import init_local_ray
from lingshu_rl.train.batch import TokenBatch, collate, pack
from lingshu_rl.train.fsdp import load_turn
from lingshu_rl.train.losses import SFTLoss
from lingshu_rl.train.split import balanced_shards, plan_updates
from lingshu_rl.train.torch_engine import TorchEngine

pytestmark = pytest.mark.slow

TOL = 1e-5


@pytest.fixture(scope="module")
def cluster():
    import ray

    init_local_ray(num_cpus=2, include_dashboard=False, namespace="test-fsdp", log_to_driver=False,
                   runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


def train_cfg(**changes: object) -> TrainConfig:
    # lr 1e-4: Adam's first steps move a weight by ~lr whatever its gradient's size, so float noise in a
    # near-zero gradient (different reduction orders at DP=2) shows as up to ~0.02 x lr in a handful of weights
    return replace(TrainConfig(lr=1e-4, micro_batch_size=2, device="cpu", threads=1, max_grad_norm=1.0), **changes)


def start_group(path: str, cfg: TrainConfig, trainable: bool = True):
    from lingshu_rl.train.group import PolicyGroup

    return PolicyGroup.start(lambda rank: {"num_cpus": 0}, path, ModelConfig(), cfg, total_steps=8,
                             trainable=trainable, seed=0, threads=1)


def grpo_batch(vocab: int, rows: int = 7) -> TokenBatch:
    """Rows of very different lengths: the token-balanced split gives the ranks different row counts."""
    gen = torch.Generator().manual_seed(0)
    lengths = [(3 + 5 * (i % 3), 2 + 7 * (i % 4)) for i in range(rows)]
    batch = collate([torch.randint(3, vocab, (p,), generator=gen).tolist() for p, _ in lengths],
                    [torch.randint(3, vocab, (r,), generator=gen).tolist() for _, r in lengths], pad_id=0)
    ref = (torch.randn(batch.input_ids.shape, generator=gen) * 0.1 - 6.5) * batch.response_mask
    mask = batch.response_mask.clone()
    mask[1] = 0  # a truncated response, masked out: it must count nowhere
    return batch.with_(advantages=torch.randn(rows, generator=gen), ref_logprobs=ref, response_mask=mask)


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_token_balanced_split() -> None:
    assert balanced_shards([10, 1, 1, 1, 1, 9, 2], 2) == [[0, 1, 2, 4], [3, 5, 6]]  # 13 and 12 tokens
    batch = grpo_batch(100)
    plan = plan_updates(batch, updates=1, dp_size=2, micro_batch_size=2)
    rows = [len(plan[r][0].batch) for r in range(2)]
    assert sorted(rows) == [3, 4] and plan[0][0].micro_batches == 2  # one rank has fewer rows
    assert plan[0][0].num_seqs == plan[1][0].num_seqs == 6  # the masked row is not counted
    assert plan[0][0].num_tokens == float(batch.response_mask.sum())


def test_load_turns_per_host() -> None:
    assert [load_turn(["a", "a", "b", "b"], r) for r in range(4)] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert [load_turn(["a", "b", "a"], r) for r in range(3)] == [(0, 2), (0, 2), (1, 2)]  # b's rank loads first


def test_dp2_grpo_updates_equal_one_process(cluster, tiny: str) -> None:
    import ray

    cfg = train_cfg(micro_batch_size=2, updates_per_step=1)
    single = TorchEngine(tiny, ModelConfig(), replace(cfg, threads=0), total_steps=8)
    group = start_group(tiny, replace(cfg, strategy="fsdp2", data_parallel_size=2))
    batch = grpo_batch(100)
    lp_single, lp_group = single.logprobs(batch, 0.7), ray.get(group.logprobs.remote(batch, 0.7))
    assert (lp_single - lp_group).abs().max().item() < TOL
    for step, mode in enumerate(("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"), start=1):
        loss = GRPOLoss(clip_low=0.2, clip_high=0.28, kl_coef=0.05, loss_agg=mode, entropy_coef=0.01,
                        temperature=0.7)
        ours, theirs = single.update(batch, loss), ray.get(group.update.remote(batch, loss))
        for key in ("actor/loss", "actor/pg_loss", "actor/kl", "actor/entropy", "actor/grad_norm"):
            assert theirs[key] == pytest.approx(ours[key], abs=TOL, rel=TOL), (mode, key)
        if step == 2:
            assert close(single.weights(), ray.get(group.weights.remote())) < TOL
    group.kill()


def test_offload_runs_fsdp2_offload_path_and_equals_one_process(cluster, tiny: str, tmp_path: Path) -> None:
    """train.offload (FSDP2's CPUOffloadPolicy): on a CPU rank nothing moves, but FSDP2's offload code runs (shards
    and gradients marked as host-resident, the optimizer stepping them there), for the policy and the reference."""
    import ray

    cfg = train_cfg(micro_batch_size=2)
    single = TorchEngine(tiny, ModelConfig(), replace(cfg, threads=0), total_steps=8)
    group = start_group(tiny, replace(cfg, strategy="fsdp2", data_parallel_size=2, offload=True))
    reference = start_group(tiny, replace(cfg, strategy="fsdp2", data_parallel_size=2, offload=True), trainable=False)
    batch = grpo_batch(100)
    assert (single.logprobs(batch, 0.7) - ray.get(reference.logprobs.remote(batch, 0.7))).abs().max().item() < TOL
    loss = GRPOLoss(kl_coef=0.05, temperature=0.7)
    for _ in range(2):
        ours, theirs = single.update(batch, loss), ray.get(group.update.remote(batch, loss))
        assert theirs["actor/grad_norm"] == pytest.approx(ours["actor/grad_norm"], abs=TOL, rel=TOL)
    assert close(single.weights(), ray.get(group.weights.remote())) < TOL
    ray.get(group.save.remote(str(tmp_path / "offloaded")))  # the export gathers from host-resident shards
    exported = TorchEngine(str(tmp_path / "offloaded" / "model"), ModelConfig(), cfg, trainable=False)
    assert close(single.weights(), exported.weights()) < TOL
    group.kill()
    reference.kill()


def test_dp2_shared_prompts_equal_one_process_without_sharing(cluster, tiny: str) -> None:
    """Ranks that run each prompt once (every layer twice per forward: prompt pass, response pass) against one
    process running every row in full: whole groups dealt to the ranks, the same update."""
    import ray

    from lingshu_rl.train.split import plan_updates

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 100, (n,), generator=gen).tolist() for n in (6, 11, 3)]
    rows = [0, 0, 0, 1, 1, 2, 2, 2]
    batch = collate([prompts[g] for g in rows], [torch.randint(3, 100, (2 + 3 * (i % 3),), generator=gen).tolist()
                                                 for i in range(len(rows))], pad_id=0)
    ref = (torch.randn(batch.input_ids.shape, generator=gen) * 0.1 - 6.5) * batch.response_mask
    batch = batch.with_(advantages=torch.randn(len(rows), generator=gen), ref_logprobs=ref)
    plan = plan_updates(batch, updates=1, dp_size=2, micro_batch_size=2)
    dealt = [{tuple(r[:n]) for r, n in zip(plan[rank][0].batch.input_ids.tolist(),
                                           plan[rank][0].batch.prompt_lengths.tolist())} for rank in range(2)]
    assert dealt[0] and dealt[1] and not dealt[0] & dealt[1]  # no prompt group is split between the ranks
    cfg = train_cfg(micro_batch_size=2, updates_per_step=1)
    single = TorchEngine(tiny, ModelConfig(), replace(cfg, threads=0, share_prompts=False), total_steps=8)
    group = start_group(tiny, replace(cfg, strategy="fsdp2", data_parallel_size=2, share_prompts=True))
    assert (single.logprobs(batch, 0.7) - ray.get(group.logprobs.remote(batch, 0.7))).abs().max().item() < TOL
    loss = GRPOLoss(clip_low=0.2, clip_high=0.28, kl_coef=0.05, loss_agg="token-mean", entropy_coef=0.01,
                    temperature=0.7)
    for _ in range(2):
        ours, theirs = single.update(batch, loss), ray.get(group.update.remote(batch, loss))
        for key in ("actor/loss", "actor/kl", "actor/entropy", "actor/grad_norm"):
            assert theirs[key] == pytest.approx(ours[key], abs=TOL, rel=TOL), key
    assert close(single.weights(), ray.get(group.weights.remote())) < TOL
    group.kill()


def test_dp2_vl_model_with_packing_equals_one_process(cluster, tiny_vl: str, tmp_path: Path) -> None:
    import ray

    from lingshu_rl.data.demo import demo_sft_sample
    from lingshu_rl.data.image_demo import make_image_demo
    from lingshu_rl.data.vision import encode_conversation_with_images, load_image_processor

    cfg = train_cfg(micro_batch_size=1)
    single = TorchEngine(tiny_vl, ModelConfig(), replace(cfg, threads=0), total_steps=8)
    group = start_group(tiny_vl, replace(cfg, strategy="fsdp2", data_parallel_size=2))
    train, _ = make_image_demo(n_train=7, n_heldout=1, cache_dir=tmp_path)
    processor = load_image_processor(tiny_vl)
    rows = [encode_conversation_with_images(single.tokenizer, processor, demo_sft_sample(s)) for s in train]
    tokens, visions = [(i, m) for i, m, _ in rows], [v for _, _, v in rows]
    packed = pack(tokens, max_length=2 * max(len(i) for i, _ in tokens), pad_id=single.tokenizer.pad_token_id,
                  visions=visions)
    assert len(packed) >= 3 and int(packed.segment_ids.max()) >= 2
    for _ in range(2):
        ours, theirs = single.update(packed, SFTLoss()), ray.get(group.update.remote(packed, SFTLoss()))
        assert theirs["sft/loss"] == pytest.approx(ours["sft/loss"], abs=TOL, rel=TOL)
        assert theirs["actor/grad_norm"] == pytest.approx(ours["actor/grad_norm"], abs=TOL, rel=TOL)
    assert close(single.weights(), ray.get(group.weights.remote())) < TOL
    group.kill()


@pytest.mark.parametrize("share_prompts", [True, False])
def test_dp2_vl_model_with_a_rank_that_sees_no_image_equals_one_process(cluster, tiny_vl: str, tmp_path: Path,
                                                                        share_prompts: bool) -> None:
    """Rank 1's rows are text-only: its forward runs the vision tower on a blank image (adding 0 x its output), so
    the vision blocks' all-gathers and reduce-scatters pair with rank 0's real ones. Without that the ranks' next
    collectives mismatch and a rank dies. Log-probs, then two GRPO updates, against one process."""
    import ray
    from conftest import image_and_text_batch

    batch = image_and_text_batch(tiny_vl, tmp_path)
    cfg = train_cfg(micro_batch_size=2, share_prompts=share_prompts)
    single = TorchEngine(tiny_vl, ModelConfig(), replace(cfg, threads=0), total_steps=8)
    group = start_group(tiny_vl, replace(cfg, strategy="fsdp2", data_parallel_size=2))
    try:
        assert float((ray.get(group.logprobs.remote(batch, 0.7), timeout=120) - single.logprobs(batch, 0.7))
                     .abs().max()) < TOL
        loss = GRPOLoss(temperature=0.7)
        for _ in range(2):
            ours, theirs = single.update(batch, loss), ray.get(group.update.remote(batch, loss), timeout=120)
            assert theirs["actor/grad_norm"] == pytest.approx(ours["actor/grad_norm"], abs=TOL, rel=TOL)
        weights = single.weights()
        assert any(k.startswith("model.visual.") for k in weights)
        assert close(weights, ray.get(group.weights.remote())) < TOL
    finally:
        group.kill()


def test_sharded_checkpoint_resumes_at_another_size(cluster, tiny: str, tmp_path: Path) -> None:
    import ray

    cfg = train_cfg(micro_batch_size=3)
    batch = grpo_batch(100)
    loss = GRPOLoss(kl_coef=0.05, temperature=0.7)
    group = start_group(tiny, replace(cfg, strategy="fsdp2", data_parallel_size=2))
    ray.get(group.update.remote(batch, loss))
    ray.get(group.save.remote(str(tmp_path / "dp2")))
    expected = ray.get(group.update.remote(batch, loss))  # the next step at DP=2
    group.kill()

    single = TorchEngine(str(tmp_path / "dp2" / "model"), ModelConfig(), cfg, total_steps=8)
    single.load_training_state(tmp_path / "dp2")
    resumed = single.update(batch, loss)  # the same next step at DP=1
    for key in ("actor/loss", "actor/grad_norm", "actor/lr", "actor/logprob_mean"):
        assert resumed[key] == pytest.approx(expected[key], abs=TOL, rel=TOL), key
    single.save(tmp_path / "dp1")
    after = single.update(batch, loss)

    group = start_group(str(tmp_path / "dp1" / "model"), replace(cfg, strategy="fsdp2", data_parallel_size=2))
    ray.get(group.load_training_state.remote(str(tmp_path / "dp1")))
    again = ray.get(group.update.remote(batch, loss))
    for key in ("actor/loss", "actor/grad_norm", "actor/lr", "actor/logprob_mean"):
        assert again[key] == pytest.approx(after[key], abs=TOL, rel=TOL), key
    group.kill()


def test_hsdp_two_copies_of_two_shards_equal_one_process_and_resume_at_dp1(cluster, tiny: str,
                                                                          tmp_path: Path) -> None:
    """train.shard_size=2 at DP=4: two replicas of a 2-rank shard group (a (replicate, shard) mesh): the same
    updates as one process, and its checkpoint continues at DP=1 with the same next step."""
    import ray

    cfg = train_cfg(micro_batch_size=2)
    single = TorchEngine(tiny, ModelConfig(), replace(cfg, threads=0), total_steps=8)
    group = start_group(tiny, replace(cfg, strategy="fsdp2", data_parallel_size=4, shard_size=2))
    placements = ray.get(group.ranks[0].__ray_call__.remote(
        lambda rank: {str(p.placements) for p in rank.engine.lm.parameters()}))
    assert placements == {"(Replicate(), Shard(dim=0))"}  # replicated across copies, sharded within one
    batch = grpo_batch(100, rows=9)
    loss = GRPOLoss(kl_coef=0.05, temperature=0.7)
    for _ in range(2):
        ours, theirs = single.update(batch, loss), ray.get(group.update.remote(batch, loss))
        for key in ("actor/loss", "actor/grad_norm"):
            assert theirs[key] == pytest.approx(ours[key], abs=TOL, rel=TOL), key
    assert close(single.weights(), ray.get(group.weights.remote())) < TOL
    ray.get(group.save.remote(str(tmp_path / "hsdp")))
    expected = ray.get(group.update.remote(batch, loss))
    group.kill()
    resumed = TorchEngine(str(tmp_path / "hsdp" / "model"), ModelConfig(), cfg, total_steps=8)
    resumed.load_training_state(tmp_path / "hsdp")
    after = resumed.update(batch, loss)
    for key in ("actor/loss", "actor/grad_norm", "actor/lr", "actor/logprob_mean"):
        assert after[key] == pytest.approx(expected[key], abs=TOL, rel=TOL), key


def test_bf16_compute_keeps_float32_master_weights(tiny: str) -> None:
    cfg = train_cfg(lr=1e-6, max_grad_norm=0.0)
    engine = TorchEngine(tiny, ModelConfig(dtype="bfloat16"), cfg, total_steps=2)
    assert all(p.dtype == torch.float32 for p in engine.params)
    before = {n: p.detach().clone() for n, p in engine.lm.named_parameters()}
    batch = grpo_batch(100)
    engine.update(batch, GRPOLoss(temperature=0.7))
    changed = [float((p.detach() != before[n]).float().mean()) for n, p in engine.lm.named_parameters()
               if n.endswith("weight") and p.dim() == 2]
    # AdamW's first step moves every weight with a gradient by ~lr = 1e-6: in bf16 storage most would round back
    assert sum(changed) / len(changed) > 0.9, changed
    assert engine.weights()["model.embed_tokens.weight"].dtype == torch.bfloat16  # what rollout and export get
    frozen = TorchEngine(tiny, ModelConfig(dtype="bfloat16"), cfg, trainable=False)
    assert frozen.lm.model.embed_tokens.weight.dtype == torch.bfloat16  # the reference needs no master copy


def test_activation_checkpointing_gives_the_same_update(tiny: str) -> None:
    batch = grpo_batch(100)
    loss = GRPOLoss(kl_coef=0.05, temperature=0.7, entropy_coef=0.01)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        # each row in full in both (checkpointing does; shared prompts are compared with full rows elsewhere)
        engine = TorchEngine(tiny, ModelConfig(), train_cfg(gradient_checkpointing=checkpointing, share_prompts=False),
                             total_steps=2)
        metrics = engine.update(batch, loss)
        results.append((metrics, engine.weights()))
    (plain, w_plain), (ckpt, w_ckpt) = results
    assert ckpt["actor/grad_norm"] == pytest.approx(plain["actor/grad_norm"], rel=1e-6)
    assert close(w_plain, w_ckpt) < 1e-7


# --- through the launcher ------------------------------------------------------------------------------------------

def launch(out: Path, *sets: str, config: str | None = None, stages: str = "sft,grpo,eval"):
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "lingshu_rl.launch", "--reward", "mcq_exact", "--output-dir", str(out),
            "--stages", stages, *(["--config", config] if config else [])]
    for item in ["logging.wandb.mode=disabled", "cluster.include_dashboard=false", *sets]:
        args += ["--set", item]
    env = {**os.environ, "LINGSHU_CACHE": str(out.parent / "cache")}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_demo_grpo_at_dp2_matches_dp1_through_the_launcher(tmp_path: Path) -> None:
    import json

    small = ["sft.stages=[]", "grpo.steps=2", "grpo.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=8",
             "train.micro_batch_size=4", "checkpoint.every=2"]
    launch(tmp_path / "dp1", *small, stages="grpo")
    launch(tmp_path / "dp2", *small, "train.strategy=fsdp2", "train.data_parallel_size=2", stages="grpo")
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("dp1", "dp2")}
    assert [r["step"] for r in rows["dp2"]] == [1, 2]
    first = [rows[name][0] for name in ("dp1", "dp2")]
    assert first[1]["reward/mean"] == first[0]["reward/mean"]  # the same generations from the same weights
    assert abs(first[1]["actor/logprob_mean"] - first[0]["actor/logprob_mean"]) < 1e-5
    assert (tmp_path / "dp2" / "checkpoints" / "step_000002" / "train_state" / ".metadata").is_file()


def test_cpu_sft_recipe_at_dp2(tmp_path: Path) -> None:
    out = launch(tmp_path / "sft", "sft.stages.0.steps=3", "sft.stages.1.steps=3", "sft.stages.1.checkpoint_every=2",
                 "train.strategy=fsdp2", "train.data_parallel_size=2", config="examples/recipes/cpu_small.yaml",
                 stages="sft")
    assert "sft stage 'shallow': 3 steps" in out and "sft stage 'deep': 3 steps" in out
    assert (tmp_path / "sft" / "sft" / "deep" / "model" / "model.safetensors").is_file()
