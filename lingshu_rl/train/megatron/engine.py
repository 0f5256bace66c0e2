"""One rank of the megatron-core training engine (the ``TrainEngine`` protocol, SPMD): data-parallel replicas of a
tensor-parallel group.

Every rank of a tensor-parallel group gets the same calls with the same micro-batches; the ranks hold 1/t of the
attention heads, FFN columns and vocabulary rows, and megatron's parallel layers exchange activations (NCCL on
GPUs, gloo on CPU). Replicas get their share of each update's batch (``train/split.py``) and sum their gradients.

  log-probs   vocabulary-parallel: logits stay split ``[N, T, Vp/t]``; the target token's log-prob comes from
              ``tensor_parallel.vocab_parallel_cross_entropy`` (max and sum-exp all-reduced, no full-vocabulary
              gather); the entropy bonus is computed the same way. Padded vocabulary rows are masked out.
  loss        the update loop shared with the torch engine (``train/update.py``): every rank of a group evaluates
              the identical loss and back-propagates it; megatron's layers route each gradient to its shard.
  options     activation recompute (``train.gradient_checkpointing``); sequence parallelism
              (``train.sequence_parallel``: norms and residuals split along the sequence, their weights' gradients
              all-reduced over the group); Qwen2.5-VL (``vision.py``: a replicated Hugging Face vision tower).
  optimiser   torch AdamW on this rank's shards (``train/optim.py``, so schedules and per-glob learning rates are
              the transformers engine's), on float32 main weights when the model is half precision; the gradient
              norm for clipping is all-reduced over the group, counting replicated parameters once. With
              ``train.distributed_optimizer`` the main weights and moments are split over the replicas
              (``optimizer.py``, ZeRO-1; megatron's own DistributedOptimizer needs its CUDA gradient buffers).
  checkpoint  ``dir/model``: full Hugging Face weights (written by rank 0); ``dir/megatron/optimizer_tp{r}*.pt``:
              rank r's optimiser state and schedule, restored by :meth:`load_training_state` at the same t.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lingshu_rl.config import ModelConfig, TrainConfig
from lingshu_rl.data.vision import copy_processor_files
from lingshu_rl.models.hf import local_weights
from lingshu_rl.models.probe import capture, probed_modules
from lingshu_rl.models.transfer import Rendezvous, TensorSpec, WeightChannel
from lingshu_rl.train.batch import TokenBatch
from lingshu_rl.train.megatron import cpu_compat
from lingshu_rl.train.megatron.convert import (
    HF_VISION,
    GPTSpec,
    canonical_name,
    hf_names_of,
    hf_to_megatron,
    merge_to_hf,
    partition_dim,
)
from lingshu_rl.train.megatron.model import attention_mask, build_model, load_shards, mrope_positions
from lingshu_rl.train.megatron.optimizer import ReplicaOptimizer
from lingshu_rl.train.megatron.vision import VisionLanguage
from lingshu_rl.train.protocol import Loss
from lingshu_rl.train.split import MiniBatch, plan_updates
from lingshu_rl.train.update import run_updates

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MASKED_LOGIT = -1e30  # padded vocabulary rows: exp() underflows to 0, and 0 * it stays finite (entropy)
PG_TIMEOUT = timedelta(minutes=10)  # a collective stuck this long (a rank died or diverged) raises


class HFCheckpoint(Mapping[str, Tensor]):
    """A Hugging Face model directory's safetensors, read one tensor at a time (no full copy per rank), under the
    names ``rename`` gives the stored ones."""

    def __init__(self, directory: str | Path, rename: Callable[[str], str] = str):
        from safetensors import safe_open

        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
            ["model.safetensors"]
        self._handles = [safe_open(str(directory / f), framework="pt") for f in files]
        self._where = {rename(key): (h, key) for h in self._handles for key in h.keys()}  # noqa: SIM118

    def __getitem__(self, key: str) -> Tensor:
        handle, stored = self._where[key]
        return handle.get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, tp_size: int,
                     device: torch.device) -> None:
    """The default process group (unless the caller made one) and megatron's TP=t, PP=1 groups."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                             world_size=world_size, timeout=PG_TIMEOUT,
                                             init_method=f"tcp://{master_addr}:{master_port}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size, pipeline_model_parallel_size=1,
                                                 distributed_timeout_minutes=int(PG_TIMEOUT.total_seconds() // 60))


def vocab_parallel_entropy(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the whole vocabulary from this rank's slice ``[..., V/t]`` -> ``[...]``.

    H = log Z - sum(p * l) with Z, sum(exp(l) * l) summed over ranks (forward all-reduce, identity backward)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    top = logits.detach().max(dim=-1, keepdim=True).values
    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_tensor_model_parallel_group())
    shifted = logits - top
    exp = shifted.exp()
    z = reduce_from_tensor_model_parallel_region(exp.sum(dim=-1))
    weighted = reduce_from_tensor_model_parallel_region((exp * shifted).sum(dim=-1))
    return z.log() - weighted / z


class MegatronEngine:
    """This process's rank of a GPTModel split over ``train.tensor_parallel_size`` ranks and replicated over
    ``train.data_parallel_size`` (ranks ``r`` with the same ``r // tp`` form one tensor-parallel group; each group
    trains on its share of the batch, the gradients are summed over the replicas before clipping). The global
    rank 0 writes and sends the Hugging Face weights. ``trainable=False`` gives a frozen reference policy."""

    def __init__(self, model_path: str, model_cfg: ModelConfig, train_cfg: TrainConfig, total_steps: int = 1,
                 trainable: bool = True, lr: float | None = None, *, rank: int = 0, master_addr: str = "127.0.0.1",
                 master_port: int = 29500, seed: int = 0):
        from megatron.core import parallel_state, tensor_parallel
        from transformers import AutoConfig, AutoTokenizer

        if train_cfg.threads:
            torch.set_num_threads(train_cfg.threads)
        self.cfg = train_cfg
        self.max_grad_norm = train_cfg.max_grad_norm
        tp = train_cfg.tensor_parallel_size
        self.device = _pick_device(train_cfg.device)
        if self.device.type == "cpu":
            cpu_compat.apply()
        else:
            torch.cuda.set_device(self.device)
        world = tp * (train_cfg.data_parallel_size if train_cfg.engine == "megatron" else 1)
        init_distributed(rank, world, master_addr, master_port, tp, self.device)
        self.group = parallel_state.get_tensor_model_parallel_group()
        self.rank = parallel_state.get_tensor_model_parallel_rank()  # within the tensor-parallel group
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.writer = torch.distributed.get_rank() == 0  # writes checkpoints, sends weights to the rollout
        if self.device.type == "cpu":
            cpu_compat.seed_rng_tracker(seed, self.rank)
        else:
            tensor_parallel.model_parallel_cuda_manual_seed(seed)

        self.model_path = model_path
        self.hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=model_cfg.trust_remote_code)
        self.spec = GPTSpec.from_hf(self.hf_config, tp)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=model_cfg.trust_remote_code) \
            if self.writer else None
        dtype, recompute = _DTYPES[model_cfg.dtype], trainable and train_cfg.gradient_checkpointing
        self.sequence_parallel = train_cfg.sequence_parallel and tp > 1
        self.model = build_model(self.spec, dtype, self.device, recompute, self.sequence_parallel)
        self.vision = VisionLanguage(self.hf_config, dtype) if self.spec.vision else None
        if self.vision is not None:
            tower = self.vision.build_tower()
            if recompute:
                tower.gradient_checkpointing_enable()
            self.model.add_module("visual", tower.to(self.device))  # type: ignore[arg-type]  # transformers wraps .to
        self.weights_dir = local_weights(model_path)
        checkpoint = HFCheckpoint(self.weights_dir, rename=lambda name: canonical_name(name, self.spec))
        load_shards(self.model, hf_to_megatron(checkpoint, self.spec, self.rank))
        start, end = self.spec.vocab_range(self.rank)
        padded = torch.arange(start, end, device=self.device) >= self.spec.vocab_size  # [Vp/t]
        self.padded_rows = padded if bool(padded.any()) else None

        self.trainable = trainable
        self.channel: WeightChannel | None = None  # rank 0's end of the weight-sync group, once joined
        if trainable:
            self.model.train()
            self.optim = ReplicaOptimizer(self._trainable(train_cfg.freeze), train_cfg, total_steps, lr, self.group,
                                          self.dp_group, train_cfg.distributed_optimizer)
        else:
            self.model.eval()
            self.model.requires_grad_(False)

    # --- forward --------------------------------------------------------------------------------------------

    def _logits(self, batch: TokenBatch) -> Tensor:
        """Vocabulary-parallel logits ``[N, T, Vp/t]``; positions and mask as the transformers engine uses them."""
        length = batch.input_ids.shape[1]
        extra = -length % self.spec.tp_size if self.sequence_parallel else 0
        if extra:  # sequence parallel: the sequence splits evenly over the ranks (padding at the end, never seen)
            batch = batch.with_(**{k: F.pad(v, (0, extra)) if v is not None else None for k, v in (
                ("input_ids", batch.input_ids), ("attention_mask", batch.attention_mask),
                ("segment_ids", batch.segment_ids), ("position_ids", batch.position_ids))})
        return self._padded_logits(batch)[:, :length]

    def _padded_logits(self, batch: TokenBatch) -> Tensor:
        input_ids = batch.input_ids.to(self.device)
        segments = batch.segment_ids
        if self.vision is not None:  # 3-D positions, image features in the image tokens' slots
            from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

            mask = attention_mask(input_ids, segments.to(self.device) if segments is not None else None)
            embeds = self.vision.embed(self.model, batch, self.device)
            if self.sequence_parallel:
                embeds = scatter_to_sequence_parallel_region(embeds)
            return self.model(input_ids, self.vision.positions(batch, self.device), mask, decoder_input=embeds)
        if batch.pixel_values is not None:
            raise ValueError(f"the batch has images but the model {self.model_path} has no vision tower")
        if segments is not None:  # packed rows: positions restart per sample, block-diagonal causal mask
            assert batch.position_ids is not None, "packed rows carry their positions (train.batch.pack)"
            positions, segments = batch.position_ids.to(self.device), segments.to(self.device)
        else:
            positions = (batch.attention_mask.to(self.device).cumsum(dim=-1) - 1).clamp(min=0)
        return self.model(input_ids, mrope_positions(positions), attention_mask(input_ids, segments))

    def _token_stats(self, logits: Tensor, input_ids: Tensor, temperature: float, with_entropy: bool
                     ) -> tuple[Tensor, Tensor | None]:
        """Log-prob of each token under the previous position's logits ``[N, T]`` (position 0 -> 0), as
        ``grpo.algorithm.token_logprobs``, and optionally the entropy aligned the same way."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits = logits.float() / temperature
        if self.padded_rows is not None:
            logits = logits.masked_fill(self.padded_rows, _MASKED_LOGIT)
        entropy = None
        if with_entropy:  # before the cross entropy, which works in place on its input
            entropy = F.pad(vocab_parallel_entropy(logits)[:, :-1], (1, 0))
        targets = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)  # last: unused
        logprobs = -vocab_parallel_cross_entropy(logits, targets)
        return F.pad(logprobs[:, :-1], (1, 0)), entropy

    @torch.no_grad()
    def logprobs(self, batch: TokenBatch, temperature: float = 1.0, micro_batches: int = 0) -> Tensor:
        """Per-token log-probs ``[N, T]`` of the policy itself (old / reference log-probs): dropout off, so the
        values are deterministic and those of the model that sampled; the previous train/eval mode is restored."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
            start = 0
            for micro in batch.chunks(self.cfg.micro_batch_size):
                lp, _ = self._token_stats(self._logits(micro), micro.input_ids.to(self.device), temperature, False)
                out[start:start + len(micro), :lp.shape[1]] = lp.cpu()
                start += len(micro)
        finally:
            self.model.train(was_training)
        return out * batch.response_mask

    # --- update ---------------------------------------------------------------------------------------------

    def update(self, work: TokenBatch | list[MiniBatch], loss: Loss) -> dict[str, float]:
        """``train.updates_per_step`` optimiser steps (the loop is :func:`lingshu_rl.train.update.run_updates`); a
        non-finite loss or gradient norm skips a step on every rank alike (both are the same everywhere)."""
        assert self.trainable, "this engine is frozen"
        if isinstance(work, TokenBatch):
            work = plan_updates(work, self.cfg.updates_per_step, 1, self.cfg.micro_batch_size)[0]
        return run_updates(self, work, loss, self.cfg.micro_batch_size)

    def forward(self, micro: TokenBatch, temperature: float, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
        logprobs, entropy = self._token_stats(self._logits(micro), micro.input_ids.to(self.device), temperature,
                                              with_entropy)
        return logprobs * micro.response_mask.to(self.device), entropy

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> float:
        self.optim.reduce_gradients()  # the replicas' gradients of the globally normalised loss sum to the update's
        return self.optim.clip_grad_norm(max_norm)

    def step(self) -> None:
        self.optim.step()

    def lr(self) -> float:
        return self.optim.lr()

    def zero_grad(self) -> None:
        self.optim.zero_grad()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Over the data-parallel replicas (the ranks of one tensor-parallel group hold the same sums)."""
        if self.dp_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, group=self.dp_group)
        return tensor.tolist()

    def _trainable(self, patterns: list[str]) -> list[tuple[str, str, torch.nn.Parameter]]:
        """Freeze by Hugging Face name globs (as the transformers engine). A fused megatron parameter (QKV,
        gate+up) freezes only if the globs cover all its HF tensors. Returns (name, an HF name, param): the HF name
        is what the per-glob learning rates in ``train/optim.py`` match against."""
        named = [(name, hf_names_of(name, self.spec), p) for name, p in self.model.named_parameters()]
        all_hf = [h for _, hs, _ in named for h in hs]
        unmatched = [g for g in patterns if not any(fnmatch.fnmatchcase(h, g) for h in all_hf)]
        if unmatched:
            raise ValueError(f"freeze patterns match no parameter: {unmatched} (names look like {all_hf[0]!r})")
        for name, hf_names, param in named:
            hits = [any(fnmatch.fnmatchcase(h, g) for g in patterns) for h in hf_names]
            if any(hits) and not all(hits):
                raise ValueError(f"freeze patterns {patterns} cover only part of {hf_names}, which the megatron "
                                 f"engine holds as one tensor ({name}); freeze all of them or none")
            if all(hits):
                param.requires_grad_(False)
        for g in self.cfg.lr_groups:
            for name, hf_names, _ in named:
                hits = [fnmatch.fnmatchcase(h, g) for h in hf_names]
                if any(hits) and not all(hits):
                    raise ValueError(f"train.lr_groups glob {g!r} covers only part of {hf_names} ({name})")
        trainable = [(name, hf_names[0], p) for name, hf_names, p in named if p.requires_grad]
        if not trainable:
            raise ValueError(f"freeze patterns {patterns} leave nothing to train")
        return trainable

    # --- weights and checkpoints ----------------------------------------------------------------------------

    def _hf_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Full HF-named tensors, one megatron parameter at a time, on the writer (global rank 0); every rank takes part
        in its tensor-parallel group's gathers (and yields nothing). With tied embeddings ``lm_head.weight`` comes
        too."""
        for name, param in self.model.named_parameters():
            data = param.detach()
            if partition_dim(name) is not None and self.spec.tp_size > 1:
                shards = [torch.empty_like(data) for _ in range(self.spec.tp_size)]
                torch.distributed.all_gather(shards, data.contiguous(), group=self.group)
            else:
                shards = [data.clone()]  # a snapshot, not the live parameter
            if self.writer:
                yield from merge_to_hf(name, shards, self.spec).items()

    def weights(self) -> dict[str, Tensor]:
        """Full HF-named weights on the writer (CPU); ``{}`` on the other ranks. Every rank must call it."""
        return {name: t.cpu() for name, t in self._hf_tensors()}

    def weight_manifest(self) -> list[TensorSpec]:
        """What :meth:`send_weights` sends (tied weights under each name), from the parameters' shapes alone."""
        specs = []
        for name, param in self.model.named_parameters():
            shard = torch.empty(param.shape, dtype=param.dtype, device="meta")
            shards = [shard] * (self.spec.tp_size if partition_dim(name) is not None else 1)
            specs += [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in merge_to_hf(name, shards, self.spec).items()]
        return specs

    def join_weight_sync(self, rendezvous: Rendezvous, bucket_bytes: int) -> None:
        """The writer becomes the source of the weight-sync group (:mod:`lingshu_rl.models.transfer`)."""
        if self.writer:
            self.channel = WeightChannel(rendezvous, 0, self.weight_manifest(), bucket_bytes, self.device)

    def send_weights(self) -> int:
        """Gather each parameter across the tensor-parallel ranks; the writer broadcasts it in buckets."""
        if self.channel is not None:
            return self.channel.send(self._hf_tensors())
        for _ in self._hf_tensors():
            pass
        return 0

    @torch.no_grad()
    def probe(self, batch: TokenBatch) -> dict[str, Tensor]:
        """Each module's output on ``batch`` under its Hugging Face name (:mod:`lingshu_rl.models.probe`; megatron's
        ``[seq, batch, hidden]`` flattens as Hugging Face's ``[batch, seq, hidden]`` for one row). Every rank runs
        the same forward; the tensor-parallel outputs are already reduced, sequence-parallel ones are gathered."""
        lm = self.spec.lm_prefix
        names = {"embedding": lm + "embed_tokens", "decoder.final_layernorm": lm + "norm"}
        for i in range(self.spec.num_layers):
            names.update({f"decoder.layers.{i}.{own}": f"{lm}layers.{i}.{hf}" for own, hf in (
                ("input_layernorm", "input_layernorm"), ("self_attention", "self_attn"),
                ("pre_mlp_layernorm", "post_attention_layernorm"), ("mlp", "mlp"))})
        split = set(names.values()) - ({lm + "embed_tokens"} if self.vision is not None else set())
        tower = [name for name, _ in self.model.named_parameters() if name.startswith("visual.")]
        names.update({own: HF_VISION + own.removeprefix("visual.") for own in probed_modules(tower)})
        with capture(self.model, names) as outputs:
            self.logprobs(batch, 1.0)
        if self.sequence_parallel:  # each rank holds its share of the (padded) sequence of the split outputs
            length = batch.input_ids.shape[1] * self.spec.hidden_size
            for name in [n for n in outputs if n in split]:  # the same order on every rank (not a set's)
                share = outputs[name].to(self.device)
                shares = [torch.empty_like(share) for _ in range(self.spec.tp_size)]
                torch.distributed.all_gather(shares, share, group=self.group)
                outputs[name] = torch.cat(shares)[:length].cpu()
        return dict(outputs)

    def save(self, directory: Path) -> None:
        """``directory/model`` (HF safetensors, config, tokenizer; the writer) and each tensor-parallel rank's
        optimiser state with its float32 main weights (:meth:`ReplicaOptimizer.save`)."""
        from huggingface_hub import save_torch_state_dict
        from transformers import GenerationConfig

        directory = Path(directory)
        weights = self.weights()
        if self.writer:
            assert self.tokenizer is not None  # the writer loads it
            model_dir = directory / "model"
            model_dir.mkdir(parents=True, exist_ok=True)
            if self.spec.tied_embeddings:
                weights.pop("lm_head.weight")
            save_torch_state_dict({k: v.contiguous() for k, v in weights.items()}, model_dir)
            self.hf_config.save_pretrained(model_dir)
            self.tokenizer.save_pretrained(model_dir)
            copy_processor_files(self.weights_dir, model_dir)  # a vision model's image processor
            with contextlib.suppress(OSError):  # OSError: the checkpoint has no generation_config.json
                GenerationConfig.from_pretrained(self.model_path).save_pretrained(model_dir)
        if self.trainable:
            self.optim.save(directory, self.spec.tp_size)
        torch.distributed.barrier()  # the checkpoint is complete when any rank returns

    def load_training_state(self, directory: Path) -> None:
        self.optim.load(Path(directory), self.spec.tp_size)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # Ray gives each rank actor one GPU (visible as device 0); torchrun sets LOCAL_RANK
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device(name)
