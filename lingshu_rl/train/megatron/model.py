"""A megatron-core ``GPTModel`` (local layer spec) shaped like a Hugging Face Qwen2/Llama checkpoint.

Positions: the model is built with megatron's multimodal RoPE (``mrope``). A text model is fed three identical rows
of position ids with every frequency taken from the first: exactly standard RoPE, but with per-token positions
(megatron's plain ``rope`` always uses 0..T-1), so packed rows whose positions restart per sample work. Qwen2.5-VL
(Lingshu) gets its own time/height/width rows and ``mrope_section`` (:mod:`lingshu_rl.train.megatron.vision`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from lingshu_rl.train.megatron.convert import GPTSpec, partition_dim


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm under megatron's norm signature (the local spec's own refuses sequence parallelism). With
    sequence parallelism each rank normalises its share of the sequence, so the weight's gradient is a partial sum:
    the weight is marked ``sequence_parallel`` and the engine all-reduces it over the tensor-parallel ranks."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_: object):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]


def transformer_config(spec: GPTSpec, dtype: torch.dtype, recompute: bool = False, sequence_parallel: bool = False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads, kv_channels=spec.head_dim, ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True, activation_func=F.silu,  # SwiGLU
        add_bias_linear=False, add_qkv_bias=spec.qkv_bias,
        hidden_dropout=0.0, attention_dropout=spec.attention_dropout,
        mrope_section=list(spec.mrope_section),
        tensor_model_parallel_size=spec.tp_size, pipeline_model_parallel_size=1,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True, perform_initialization=False,  # weights come from the checkpoint
        attention_softmax_in_fp32=True, sequence_parallel=sequence_parallel,
        # activation recompute: keep each layer's input only, recompute the layer in the backward pass
        **({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
           if recompute else {}))


def build_model(spec: GPTSpec, dtype: torch.dtype, device: torch.device, recompute: bool = False,
                sequence_parallel: bool = False):
    """The model for this rank (parallel_state must be initialised); parameters uninitialised, on ``device``;
    ``recompute``: activation recompute of every layer; ``sequence_parallel``: the activations outside attention and
    MLP (norms, residuals) split along the sequence over the tensor-parallel ranks. A vision-language model's
    embeddings are scattered by the engine, after the image features are put in (``vision.py``)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules = replace(layer.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm)
    block = TransformerBlockSubmodules(layer_specs=[layer] * spec.num_layers, layer_norm=RMSNorm)
    model = GPTModel(transformer_config(spec, dtype, recompute, sequence_parallel), block,
                     vocab_size=spec.padded_vocab_size, max_sequence_length=spec.max_positions,
                     parallel_output=True, share_embeddings_and_output_weights=spec.tied_embeddings,
                     position_embedding_type="mrope", rotary_base=spec.rope_theta,
                     scatter_embedding_sequence_parallel=not spec.vision)
    return model.to(device)


def load_shards(model: torch.nn.Module, shards: dict[str, Tensor]) -> None:
    """Copy this rank's converted parameters into ``model``; names and shapes must match exactly.

    Also marks the split parameters ``tensor_model_parallel`` (megatron sets that only when it initialises
    weights itself), which megatron's utilities (e.g. ``param_is_not_tensor_parallel_duplicate``) rely on."""
    params = dict(model.named_parameters())
    if set(params) != set(shards):
        raise KeyError(f"converter/model mismatch: missing {sorted(set(params) - set(shards))[:5]}, "
                       f"unexpected {sorted(set(shards) - set(params))[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != shards[name].shape:
                raise ValueError(f"{name}: model shape {tuple(param.shape)} != converted {tuple(shards[name].shape)}")
            param.copy_(shards[name])
            dim = partition_dim(name)
            # megatron's own attributes on parameters, which torch's stubs do not declare
            param.tensor_model_parallel = dim is not None  # type: ignore[attr-defined]
            param.partition_dim = dim if dim is not None else -1  # type: ignore[attr-defined]
            param.partition_stride = 1  # type: ignore[attr-defined]


def attention_mask(input_ids: Tensor, segment_ids: Tensor | None) -> Tensor:
    """Megatron's boolean mask (True = may not attend): ``[1, 1, T, T]`` causal, or ``[N, 1, T, T]`` for packed
    rows (causal within a packed sample; padding attends to itself so no softmax row is empty)."""
    length = input_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    if segment_ids is None:
        return ~causal[None, None]
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
    allowed = (same & causal) | torch.eye(length, dtype=torch.bool, device=input_ids.device)
    return ~allowed[:, None]


def mrope_positions(position_ids: Tensor) -> Tensor:
    """``[N, T]`` positions -> the ``[3, N, T]`` rows megatron's mrope expects (identical: plain RoPE)."""
    return position_ids[None].expand(3, -1, -1)
