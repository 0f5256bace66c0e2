"""Typed run configuration: dataclasses, one YAML file, dotted command-line overrides, clear errors.

``load_config("run.yaml", ["grpo.kl_coef=0.01", "rollout.n=4"])`` builds a :class:`RunConfig`. Unknown keys
and values of the wrong type raise :class:`ConfigError` naming the key and listing the valid choices.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lingshu_rl.telemetry import WandbConfig


class ConfigError(ValueError):
    """A configuration key or value that does not fit the schema."""


@dataclass
class ModelConfig:
    path: str = "tiny"  # a Hugging Face model directory or hub id; "tiny" / "tiny-vl" build the embedded demo models
    trust_remote_code: bool = False  # run code shipped with a model; off unless you trust the source
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class DataConfig:
    train: str = "demo"  # "demo" (generated medical MCQ set), "image_demo" (synthetic scans) or a JSONL/Parquet file
    heldout: str = "demo"  # evaluation split: "demo" or a file
    max_prompt_tokens: int = 512  # longer prompts (image tokens included) are rejected with the sample id
    skip_missing_images: bool = False  # leave out (and count) samples whose image files are missing, not stop
    shuffle: bool = True


@dataclass
class RolloutConfig:
    engine: Literal["auto", "transformers", "vllm"] = "transformers"  # auto: vLLM when importable, else transformers
    n: int = 8  # responses sampled per prompt (the GRPO group size)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 64
    min_new_tokens: int = 0  # the end-of-turn token is not sampled before this many tokens (stop strings still stop)
    stop: list[str] = field(default_factory=list)  # extra stop strings besides the end-of-turn token
    num_workers: int = 1  # rollout actors; a batch is split between them
    tensor_parallel_size: int = 1  # vLLM: devices per rollout worker
    gpu_memory_utilization: float = 0.5  # vLLM on GPU: fraction of the GPU's memory for its weights + KV cache
    enable_sleep_mode: bool = False  # vLLM on one GPU shared with the actor: free its memory during the update
    tis_cap: float = 0.0  # truncated importance sampling: weight tokens by min(exp(train - rollout logp), cap); 0 off
    # new weights after each update: "collective" (a process group of the actor's rank 0 and the rollout workers,
    # bucket by bucket), "ipc" (the same buckets through one buffer the actor's rank 0 shares with rollout workers
    # on its node: shared memory on CPU, CUDA IPC on its GPU) or "object_store" (the whole state dict through Ray's
    # object store); see grpo/sync.py
    weight_sync: Literal["collective", "ipc", "object_store"] = "collective"
    sync_bucket_mb: int = 256  # collective/ipc: bytes per bucket (ipc: the shared buffer holds the largest)
    sync_timeout_s: float = 600.0  # collective/ipc: a member that does not take part by then fails the sync
    # the canary after each sync: mean |log-prob difference| allowed between actor and rollout (None: by dtype,
    # 1e-3 for float32, 5e-2 for bfloat16/float16); above it the run stops naming the first module that differs
    canary_tolerance: float | None = None
    sync_module_check: bool = False  # compare every module's output on the canary after every sync, not only on a miss


@dataclass
class TrainConfig:
    engine: Literal["torch", "megatron"] = "torch"  # megatron: megatron-core tensor parallel (extra [megatron])
    strategy: Literal["none", "fsdp2"] = "none"  # torch engine: none = one device; fsdp2 = sharded data parallel
    data_parallel_size: int = 1  # fsdp2 ranks, or megatron replicas of the TP group; batches dealt by tokens
    # fsdp2: ranks one copy of the model is sharded over. 0: all of them (FSDP); a divisor k of data_parallel_size:
    # HSDP, groups of k consecutive ranks (one node each) each hold a sharded copy, gradients all-reduced across
    shard_size: int = 0
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (memory for compute)
    offload: bool = False  # fsdp2: parameters, gradients and optimizer state live in CPU memory between uses
    share_prompts: bool = True  # GRPO rows sharing a prompt run it once per micro-batch (torch engine)
    logprob_chunk: int = 1024  # response positions whose logits are formed at once (memory: chunk x vocab)
    tensor_parallel_size: int = 1  # megatron engine: ranks (Ray actors, one GPU each) sharing the model
    pipeline_parallel_size: int = 1  # megatron engine: only 1 is supported for now
    sequence_parallel: bool = False  # megatron engine, TP > 1: norms and residuals split along the sequence
    # megatron engine, data_parallel_size > 1: float32 main weights and Adam moments split over the replicas (ZeRO-1)
    # instead of whole on each; fsdp2 always shards them
    distributed_optimizer: bool = True
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # linear learning-rate warm-up, in optimiser steps
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    max_grad_norm: float = 1.0  # gradient clipping (0 disables)
    micro_batch_size: int = 16  # sequences per forward/backward; gradients accumulate up to the update
    updates_per_step: int = 1  # optimiser updates per GRPO step (>1 splits the batch into mini-batches)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads per worker (0: torch's default)
    freeze: list[str] = field(default_factory=list)  # parameter-name globs kept frozen, e.g. "model.visual.*"
    lr_groups: dict[str, float] = field(default_factory=dict)  # glob -> learning rate, e.g. {"model.visual.*": 2e-6}


@dataclass
class GRPOConfig:
    steps: int = 100
    prompts_per_step: int = 8
    adv_scale: Literal["group", "batch", "none"] = "group"  # none = Dr. GRPO (no std scaling)
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO clip-higher: e.g. 0.28
    kl_coef: float = 0.001  # KL loss to the reference policy; 0 skips the reference worker
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # k3 = low-variance KL (verl's low_var_kl)
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    entropy_coef: float = 0.0
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (DAPO)
    mask_truncated: bool = False  # leave responses cut at max_new_tokens out of the loss (DAPO overlong filter)
    max_nan_steps: int = 3  # consecutive skipped (non-finite loss) updates before the run stops
    # generate step t+1's rollouts while step t scores and updates (one step stale; the ratio is against the
    # sampling policy's log-probs, or with rollout.tis_cap the truncated importance weight corrects for it)
    one_step_off: bool = False


@dataclass
class SFTSourceConfig:
    path: str = "demo"  # "demo", "image_demo" or a JSONL/Parquet file; samples end with an assistant turn (or `target`)
    epochs: float = 1.0  # passes over this source per stage; a fraction takes a seeded subset
    weight: float | None = None  # instead: draw batches from sources in proportion to weight (needs stage steps)
    skip_missing_images: bool = False  # leave out (and count) samples whose image files are missing, not stop


@dataclass
class SFTStageConfig:
    """One supervised stage: a data mix, what trains, and how. Starts from the previous stage's model."""

    name: str = "sft"  # also the stage's folder: OUTPUT_DIR/sft/<name>
    data: list[SFTSourceConfig] = field(default_factory=lambda: [SFTSourceConfig()])
    freeze: list[str] = field(default_factory=list)  # parameter-name globs kept frozen in this stage
    lr: float = 1e-5
    lr_groups: dict[str, float] = field(default_factory=dict)  # glob -> learning rate (e.g. vision 2e-6)
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    steps: int = 0  # optimiser steps; 0: one pass over the mix (its epochs)
    batch_size: int = 32  # samples (or packed rows) per optimiser step
    max_length: int = 1024  # tokens per sample (longer ones are cut) and per packed row
    packing: bool = False
    chat_template: str | None = None  # a Jinja chat template file replacing the tokenizer's from this stage on
    checkpoint_every: int = 50


@dataclass
class SFTConfig:
    stages: list[SFTStageConfig] = field(default_factory=list)


@dataclass
class EvalConfig:
    benchmarks: list[str] = field(default_factory=list)  # e.g. [demo] or [medqa, pubmedqa]; empty: no eval stage
    data_dir: str | None = None  # folder of the benchmarks' original files (`python -m lingshu_rl.eval list`)
    limit: int | None = None  # items per benchmark (None: all)
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    max_new_tokens: int = 64
    compare: bool = True  # also evaluate the base and post-SFT models and write one comparison table


@dataclass
class RewardConfig:
    # reward references, "0.5*format+1.0*mcq_exact", or {ref, weight, kwargs} entries
    rewards: list[Any] = field(default_factory=lambda: ["mcq_exact"])
    workers: int = 2  # reward processes beside the scoring actor (0: score in the actor itself, no timeouts)
    timeout_s: float = 30.0  # per sample
    failure_score: float = 0.0
    # the sandbox of each reward process (0 turns a limit off); see lingshu_rl/rewards/sandbox.py
    memory_limit_mb: int = 8192  # address space
    cpu_limit_s: int = 120  # CPU seconds per sample
    max_processes: int = 32  # processes a reward worker may have at once
    file_limit_mb: int = 256  # largest file a reward may write (its printed output included)
    env_allow: list[str] = field(default_factory=list)  # environment variables rewards may see (secrets are hidden)


@dataclass
class ClusterConfig:
    address: str | None = None  # an existing Ray cluster ("auto", "ray://host:10001"); None starts a local one
    num_cpus: int | None = None  # CPUs a local cluster declares (None: all)
    colocate: bool = True  # all roles share one placement group (one machine); False: a group per role
    # colocated actor, reference and rollout engines in ONE process (lingshu_rl.grpo.workers.HybridWorker): no
    # process switches between phases, weights to the rollout engine in place (one machine or one GPU; torch
    # engine, one training rank, one rollout worker)
    hybrid: bool = False
    actor_cpus: float = 1.0
    actor_gpus: float = 0.0
    rollout_cpus: float = 1.0  # per rollout worker
    rollout_gpus: float = 0.0
    ref_cpus: float = 1.0
    ref_gpus: float = 0.0
    # custom Ray resources added to each bundle of a role (`ray start --resources '{"trainer": 8}'` on the nodes
    # it may use): pins roles to labelled nodes. Colocated, the one shared bundle carries all of them.
    actor_resources: dict[str, float] = field(default_factory=dict)  # per rank
    rollout_resources: dict[str, float] = field(default_factory=dict)  # per rollout worker
    ref_resources: dict[str, float] = field(default_factory=dict)  # per rank
    reward_resources: dict[str, float] = field(default_factory=dict)  # the reward scorer (reward.workers CPUs)
    dashboard_host: str = "127.0.0.1"  # never exposed beyond this machine unless you set it
    dashboard_port: int = 8265  # taken (another Ray): a free port is used and printed
    include_dashboard: bool = True
    metrics_export_port: int | None = None  # Prometheus endpoint of Ray's metrics agent (None: Ray picks)
    placement_timeout_s: float = 120.0  # a role's placement group not placed by then stops the run, naming it


@dataclass
class CheckpointConfig:
    every: int = 50  # steps between checkpoints (a final one is always written)
    keep: int = 2  # newest checkpoints kept


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    samples_per_step: int = 4  # rows written to samples.jsonl each step
    ray_metrics: bool = True
    console: bool = True
    # keep prompts, responses, answers and image paths out of every file the run writes (samples.jsonl, eval
    # predictions): for data with patient information. Ids, rewards, scores and lengths are still written.
    redact_text: bool = False


@dataclass
class RunConfig:
    seed: int = 0
    output_dir: str | None = None  # default: runs/<timestamp>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, lists for tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_type, value_type = args or (Any, Any)
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in hints:
            raise ConfigError(f"unknown config key {full!r}; valid keys{' under ' + repr(prefix) if prefix else ''}: "
                              f"{', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict; the value is parsed as YAML (``0.1``, ``true``, ``[a, b]``)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.path=value")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    node: Any = tree
    for key in keys[:-1]:
        if isinstance(node, list):  # list items by index: sft.stages.0.lr=1e-5
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {assignment!r}: {key!r} is not an index of a {len(node)}-item list")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {assignment!r}: {key!r} is not a section")
    value = yaml.safe_load(raw) if raw.strip() else ""
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {assignment!r}: {last!r} is not an index of a {len(node)}-item list")
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file, then each ``key.path=value`` override, validated together."""
    tree = to_dict(RunConfig())
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        _merge(tree, loaded)
    for assignment in overrides or []:
        apply_override(tree, assignment)
    config = from_dict(RunConfig, tree)
    validate(config)
    return config


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def validate(config: RunConfig) -> None:
    """Value checks the types cannot express."""
    checks = [
        (config.rollout.n >= 2, "rollout.n must be >= 2 (GRPO compares responses within a group)"),
        (config.rollout.temperature > 0, "rollout.temperature must be > 0"),
        (0 < config.rollout.top_p <= 1, "rollout.top_p must be in (0, 1]"),
        (config.rollout.max_new_tokens > 0, "rollout.max_new_tokens must be > 0"),
        (not (config.grpo.one_step_off and config.rollout.engine == "transformers"),
         "grpo.one_step_off needs the rollout engine's sampling log-probs: use rollout.engine=vllm (or auto)"),
        (not (config.grpo.one_step_off and config.cluster.hybrid),
         "grpo.one_step_off needs a process per role (cluster.hybrid=false): one process cannot generate and "
         "update at once"),
        (0 <= config.rollout.min_new_tokens <= config.rollout.max_new_tokens,
         "rollout.min_new_tokens must be between 0 and rollout.max_new_tokens"),
        (config.rollout.num_workers >= 1, "rollout.num_workers must be >= 1"),
        (config.rollout.tensor_parallel_size >= 1, "rollout.tensor_parallel_size must be >= 1"),
        (0 < config.rollout.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization must be in (0, 1]"),
        (config.rollout.tis_cap == 0 or config.rollout.tis_cap >= 1,
         "rollout.tis_cap must be 0 (off) or >= 1 (the largest importance weight)"),
        (not (config.rollout.tis_cap and config.rollout.engine == "transformers"),
         "rollout.tis_cap needs the rollout engine's sampling log-probs: use rollout.engine=vllm (or auto)"),
        (config.grpo.steps >= 0 and config.grpo.prompts_per_step >= 1,
         "grpo.steps >= 0 and grpo.prompts_per_step >= 1"),
        (config.grpo.kl_coef >= 0, "grpo.kl_coef must be >= 0"),
        (config.grpo.clip_low >= 0 and config.grpo.clip_high >= 0, "grpo.clip_low/clip_high must be >= 0"),
        (config.train.lr > 0 and config.train.micro_batch_size >= 1, "train.lr > 0 and train.micro_batch_size >= 1"),
        (config.train.updates_per_step >= 1, "train.updates_per_step must be >= 1"),
        (config.train.tensor_parallel_size >= 1, "train.tensor_parallel_size must be >= 1"),
        (config.train.pipeline_parallel_size == 1, "train.pipeline_parallel_size: only 1 is supported"),
        (config.train.engine == "megatron" or config.train.tensor_parallel_size == 1,
         "train.tensor_parallel_size > 1 needs train.engine=megatron"),
        (not config.train.sequence_parallel or (config.train.engine == "megatron"
                                                and config.train.tensor_parallel_size > 1),
         "train.sequence_parallel needs train.engine=megatron and train.tensor_parallel_size > 1"),
        (config.train.data_parallel_size >= 1, "train.data_parallel_size must be >= 1"),
        (config.train.strategy == "none" or config.train.engine == "torch",
         "train.strategy=fsdp2 is the torch engine's (megatron shards by train.tensor_parallel_size)"),
        (config.train.data_parallel_size == 1 or config.train.strategy == "fsdp2" or config.train.engine == "megatron",
         "train.data_parallel_size > 1 needs train.strategy=fsdp2 (torch engine) or train.engine=megatron"),
        (not config.train.offload or config.train.strategy == "fsdp2", "train.offload needs train.strategy=fsdp2"),
        (config.train.shard_size == 0 or (config.train.strategy == "fsdp2" and config.train.shard_size > 0
                                          and config.train.data_parallel_size % config.train.shard_size == 0),
         "train.shard_size needs train.strategy=fsdp2 and must divide train.data_parallel_size (0: shard over all)"),
        (not config.cluster.hybrid or (config.cluster.colocate and config.train.engine == "torch"
                                       and config.train.strategy == "none" and config.rollout.num_workers == 1),
         "cluster.hybrid=true needs cluster.colocate=true, train.engine=torch, train.strategy=none and "
         "rollout.num_workers=1 (one process holds the actor, the reference and one rollout engine)"),
        (config.train.logprob_chunk >= 1, "train.logprob_chunk must be >= 1"),
        (config.checkpoint.every >= 1 and config.checkpoint.keep >= 1,
         "checkpoint.every and checkpoint.keep must be >= 1"),
        (config.reward.timeout_s > 0, "reward.timeout_s must be > 0"),
        (len(config.reward.rewards) >= 1, "reward.rewards needs at least one reward"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
