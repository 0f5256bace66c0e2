"""The megatron engine trains a bfloat16 model through float32 main weights (real megatron-core over gloo).

An update of 1e-6 moves nearly every main weight, while a bfloat16 copy updated in place would keep most of its
values (of weights ~ N(0, 0.02) in bf16, a change of 1e-6 is below half a unit in the last place for ~98%); the
model's bf16 weights are the rounded main weights after every step, and a checkpoint restores the main weights
exactly. The bf16 gradients of the micro-batches accumulate in float32.
"""

from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from lingshu_rl.config import ModelConfig, TrainConfig
from lingshu_rl.launch.ray_cluster import init_local_ray

pytestmark = [pytest.mark.slow, pytest.mark.skipif(find_spec("megatron") is None or find_spec("megatron.core") is None,
                                                   reason="megatron-core is not installed")]


def test_bf16_model_updates_float32_main_weights(tmp_path: Path) -> None:
    import ray

    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.grpo.workers import PolicyWorker
    from lingshu_rl.models.tiny import build_tiny_model
    from lingshu_rl.train.batch import collate

    def _state(worker) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # runs in the actor (pickled by value)
        optim = worker.engine.optim
        return [p.detach().clone() for p in optim.params], [m.detach().clone() for m in optim.main]

    path = str(build_tiny_model(tmp_path / "cache"))
    gen = torch.Generator().manual_seed(0)
    batch = collate([torch.randint(3, 300, (9,), generator=gen).tolist() for _ in range(8)],
                    [torch.randint(3, 300, (7,), generator=gen).tolist() for _ in range(8)], pad_id=0)
    batch = batch.with_(advantages=torch.randn(8, generator=gen))
    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = TrainConfig(engine="megatron", lr=1e-6, warmup_steps=0, max_grad_norm=0.0, threads=1)
        worker = ray.remote(PolicyWorker).options(num_cpus=0).remote(path, ModelConfig(dtype="bfloat16"), cfg, 4,
                                                                     True, 0, 1)
        params, main = ray.get(worker.__ray_call__.remote(_state))
        half = [i for i, p in enumerate(params) if p.dtype == torch.bfloat16]  # megatron keeps norms in float32
        assert len(half) > len(params) // 2 and all(m.dtype == torch.float32 for m in main)
        ray.get(worker.update.remote(batch, GRPOLoss()))
        params_after, main_after = ray.get(worker.__ray_call__.remote(_state))
        moved = sum(int((main_after[i] != main[i]).sum()) for i in half) / sum(main[i].numel() for i in half)
        rounded = sum(int((params_after[i] != params[i]).sum()) for i in half) / sum(params[i].numel() for i in half)
        assert moved > 0.9, moved  # Adam's first step moves every weight with a gradient by ~lr
        assert rounded < 0.2, rounded  # what bf16 storage would have kept of the same update
        assert all(torch.equal(p, m.to(p.dtype)) for p, m in zip(params_after, main_after))

        ray.get(worker.save.remote(str(tmp_path / "ckpt")))
        resumed = ray.remote(PolicyWorker).options(num_cpus=0).remote(
            str(tmp_path / "ckpt" / "model"), ModelConfig(dtype="bfloat16"), cfg, 4, True, 0, 1)
        ray.get(resumed.load_training_state.remote(str(tmp_path / "ckpt")))
        _, main_resumed = ray.get(resumed.__ray_call__.remote(_state))
        assert all(torch.equal(a, b) for a, b in zip(main_resumed, main_after))
    finally:
        ray.shutdown()


def test_bf16_gradients_accumulate_in_float32_over_micro_batches(tmp_path: Path) -> None:
    """Eight micro-batches of one row: the accumulated gradient of every bf16 tensor is float32 and the exact float32
    sum of the eight bf16 gradients, which a bf16 running sum (autograd's own accumulation) is not."""
    import ray

    from lingshu_rl.grpo.workers import PolicyWorker
    from lingshu_rl.models.tiny import build_tiny_model
    from lingshu_rl.train.batch import collate

    gen = torch.Generator().manual_seed(1)
    batch = collate([torch.randint(3, 300, (9,), generator=gen).tolist() for _ in range(8)],
                    [torch.randint(3, 300, (7,), generator=gen).tolist() for _ in range(8)], pad_id=0)

    def gradients(worker) -> tuple[list[list[torch.Tensor]], list[torch.Tensor], list[torch.dtype]]:
        engine, optim = worker.engine, worker.engine.optim

        def backward(micro) -> None:
            logprobs, _ = engine.forward(micro, 1.0, False)
            engine.backward(logprobs.sum())

        each = []
        for micro in batch.chunks(1):
            optim.zero_grad()
            backward(micro)
            each.append([g.clone() for g in optim.grads])
        optim.zero_grad()
        for micro in batch.chunks(1):
            backward(micro)
        return each, [g.clone() for g in optim.grads], [p.dtype for p in optim.params]

    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = TrainConfig(engine="megatron", lr=1e-6, micro_batch_size=1, threads=1)
        worker = ray.remote(PolicyWorker).options(num_cpus=0).remote(
            str(build_tiny_model(tmp_path / "cache")), ModelConfig(dtype="bfloat16"), cfg, 4, True, 0, 1)
        each, summed, dtypes = ray.get(worker.__ray_call__.remote(gradients))
    finally:
        ray.shutdown()
    half = [i for i, dtype in enumerate(dtypes) if dtype == torch.bfloat16]
    assert half and all(summed[i].dtype == torch.float32 for i in half)
    rounded_away = 0
    for i in half:
        exact, running = torch.zeros_like(summed[i]), torch.zeros_like(summed[i], dtype=torch.bfloat16)
        for grads in each:
            assert torch.equal(grads[i], grads[i].bfloat16().float())  # each micro-batch's gradient is bf16
            exact += grads[i]
            running += grads[i].bfloat16()
        assert torch.equal(summed[i], exact)
        rounded_away += int((running.float() != exact).sum())
    assert rounded_away > 0  # a bf16 running sum would have lost bits
