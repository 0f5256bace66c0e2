"""Megatron data x tensor parallel against the torch engine on the tiny Qwen2 (real megatron-core over gloo).

DP=2 x TP=1, DP=1 x TP=2 and DP=2 x TP=2 rank actors: the batch is dealt to the replicas by tokens (rows of
uneven length, uneven micro-batch counts), the loss normalised over the whole batch, the gradients summed over
the replicas. Step-1 log-probs and the weights after two updates must equal the torch engine's within 1e-4, also
with activation recompute, with sequence parallelism (micro-batches of odd and even lengths), and with the
optimiser state split over the replicas or whole on each; a split state resumes at another replica count.
"""

from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from lingshu_rl.config import ModelConfig, TrainConfig
from lingshu_rl.launch.ray_cluster import init_local_ray

pytestmark = [pytest.mark.slow, pytest.mark.skipif(find_spec("megatron") is None or find_spec("megatron.core") is None,
                                                   reason="megatron-core is not installed")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """The tiny model, a batch, and the torch engine's step-1 log-probs and weights after two updates."""
    import ray
    from conftest import torch_engine_reference

    from lingshu_rl.models.tiny import build_tiny_model
    from lingshu_rl.train.batch import collate

    path = str(build_tiny_model(tmp_path_factory.mktemp("cache")))
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 20, (12, 2), generator=gen).tolist()  # prompt, response
    prompts = [torch.randint(3, 300, (p,), generator=gen).tolist() for p, _ in lengths]
    responses = [torch.randint(3, 300, (r,), generator=gen).tolist() for _, r in lengths]
    batch = collate(prompts, responses, pad_id=0).with_(advantages=torch.randn(12, generator=gen))
    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ref = torch_engine_reference(path, batch, train_cfg())
    logprobs, initial, weights = ref["logprobs"], ref["initial"], ref["weights"]
    # Adam moves each weight by about lr = 1e-3 per step: a replica's update lost or counted twice shows at 1e-4
    assert min(float((weights[k] - initial[k]).abs().max()) for k in weights) > 1e-3
    yield path, batch, logprobs, weights
    ray.shutdown()


def train_cfg(**changes) -> TrainConfig:
    return TrainConfig(lr=1e-3, micro_batch_size=2, max_grad_norm=1.0, threads=1, **changes)


@pytest.mark.parametrize("dp, tp, recompute, sequence_parallel, split", [
    (2, 1, False, False, True), (2, 1, False, False, False), (1, 2, False, False, True), (2, 2, False, False, True),
    (1, 2, True, False, True), (2, 2, False, True, True)])
def test_megatron_data_x_tensor_parallel_matches_torch_engine(reference, dp: int, tp: int, recompute: bool,
                                                              sequence_parallel: bool, split: bool,
                                                              tmp_path: Path) -> None:
    import ray

    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.train.group import PolicyGroup

    path, batch, logprobs, weights = reference
    cfg = train_cfg(engine="megatron", data_parallel_size=dp, tensor_parallel_size=tp, gradient_checkpointing=recompute,
                    sequence_parallel=sequence_parallel, distributed_optimizer=split)
    group = PolicyGroup.start(lambda rank: {"num_cpus": 0}, path, ModelConfig(), cfg, 4, True, 0, 1)
    try:
        got = ray.get(group.logprobs.remote(batch, 0.7))
        assert float((got - logprobs).abs().max()) < 1e-4
        for _ in range(2):
            metrics = ray.get(group.update.remote(batch, GRPOLoss(temperature=0.7)))
            assert metrics["actor/nan_skipped"] == 0
        after = ray.get(group.weights.remote())
        assert sorted(after) == sorted(weights)
        worst = max(float((after[k] - weights[k]).abs().max()) for k in weights)
        assert worst < 1e-4, worst

        ray.get(group.save.remote(str(tmp_path / "ckpt")))
        files = sorted(p.name for p in (tmp_path / "ckpt" / "megatron").iterdir())
        if dp > 1 and split:  # each replica's TP ranks write their share
            assert files == [f"optimizer_tp{r}_dp{d}.pt" for r in range(tp) for d in range(dp)]
            check_shares(tmp_path / "ckpt" / "megatron", tp, dp)
        else:  # the first replica writes one file per TP rank
            assert files == [f"optimizer_tp{r}.pt" for r in range(tp)]
    finally:
        group.kill()


def check_shares(folder: Path, tp: int, dp: int) -> None:
    """The replicas' shares of each TP rank's tensors are disjoint, cover them all, and are about equal in size."""
    for r in range(tp):
        shares = [torch.load(folder / f"optimizer_tp{r}_dp{d}.pt", weights_only=True)["tensors"] for d in range(dp)]
        names = [set(share) for share in shares]
        assert not set.intersection(*names) and all(names)
        sizes = [sum(t["main"].numel() for t in share.values()) for share in shares]
        largest = max(t["main"].numel() for share in shares for t in share.values())
        assert max(sizes) - min(sizes) <= largest, sizes  # dealt largest first to the least-loaded replica
        assert all({"exp_avg", "exp_avg_sq", "step"} <= set(t) for share in shares for t in share.values())


@pytest.mark.parametrize("before, after", [((2, True), (1, True)), ((1, True), (2, True)), ((2, True), (2, False))])
def test_optimizer_state_resumes_at_another_replica_count(reference, before: tuple[int, bool],
                                                          after: tuple[int, bool], tmp_path: Path) -> None:
    """One update at ``before`` = (replicas, split), a checkpoint, the second update at ``after`` from it: the
    weights must be the torch engine's after two updates (fresh Adam moments would move them by ~lr = 1e-3)."""
    import ray

    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.train.group import PolicyGroup

    path, batch, _, weights = reference
    ckpt = tmp_path / "ckpt"
    for step, ((dp, split), model) in enumerate([(before, path), (after, str(ckpt / "model"))]):
        cfg = train_cfg(engine="megatron", data_parallel_size=dp, distributed_optimizer=split)
        group = PolicyGroup.start(lambda rank: {"num_cpus": 0}, model, ModelConfig(), cfg, 4, True, 0, 1)
        try:
            if step:
                ray.get(group.load_training_state.remote(str(ckpt)))
            ray.get(group.update.remote(batch, GRPOLoss(temperature=0.7)))
            if step:
                got = ray.get(group.weights.remote())
                worst = max(float((got[k] - weights[k]).abs().max()) for k in weights)
                assert worst < 1e-4, worst
            else:
                ray.get(group.save.remote(str(ckpt)))
        finally:
            group.kill()
