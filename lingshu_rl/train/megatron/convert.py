"""Hugging Face <-> megatron-core GPTModel weights, per tensor-parallel rank (Qwen2 / Qwen2.5 / Llama family).

Pure tensor reshuffling, no process groups: ``hf_to_megatron`` gives one rank's shards, ``megatron_to_hf`` puts
all ranks' shards back together. Both are exact (slicing and concatenation only), so a round trip returns every
tensor bit for bit. Megatron names are those of ``GPTModel`` with the local (non-Transformer-Engine) layer spec.

Layouts (h hidden, n query heads, g key/value groups, d head dim, f FFN size, V vocabulary, Vp padded, t TP size):
  linear_qkv  [g * (n/g + 2) * d, h]: per group g: its n/g query heads, then its key head, then its value head;
              rank r holds the contiguous block r of t along dim 0 (whole groups when g % t == 0).
  linear_proj [h, n*d]  split along dim 1 (rank r: query heads r*n/t ...).
  linear_fc1  [2f/t, h] per rank = [gate rows of rank r; up rows of rank r]  (SwiGLU: silu(first half) * second).
  linear_fc2  [h, f]    split along dim 1.
  word_embeddings / output_layer [Vp, h]: rows padded with zeros from V to Vp, then split along dim 0. The
              engine masks logits of the padded rows, so they never take probability mass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

VOCAB_DIVISIBLE_BY = 128  # megatron's convention: Vp is a multiple of 128 * t


@dataclass(frozen=True)
class GPTSpec:
    """The architecture facts the converter and the model builder need, read from a Hugging Face config."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int  # V, the model's own vocabulary (config.vocab_size)
    padded_vocab_size: int  # Vp, a multiple of VOCAB_DIVISIBLE_BY * tp_size
    tied_embeddings: bool
    qkv_bias: bool
    norm_eps: float
    rope_theta: float
    max_positions: int
    attention_dropout: float
    tp_size: int

    @classmethod
    def from_hf(cls, config: Any, tp_size: int) -> GPTSpec:
        """Check that ``config`` is a supported architecture and read it; unsupported features raise."""
        kind = config.model_type
        if kind not in ("qwen2", "llama"):
            raise ValueError(f"the megatron engine converts Qwen2/Qwen2.5/Llama checkpoints, not {kind!r}")
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{kind}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{kind}: RoPE scaling {rope_type!r} is not supported by the converter")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        if kind == "qwen2":
            if getattr(config, "use_sliding_window", False):
                raise ValueError("qwen2: sliding-window attention is not supported")
            qkv_bias = True
        else:
            if getattr(config, "mlp_bias", False) or getattr(config, "attention_bias", False):
                raise ValueError("llama: attention_bias/mlp_bias are not supported")
            qkv_bias = False
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if heads % tp_size or (kv_heads % tp_size and tp_size % kv_heads):
            raise ValueError(f"tensor_parallel_size {tp_size} must divide the {heads} attention heads and divide "
                             f"(or be a multiple of) the {kv_heads} key/value heads")
        if config.intermediate_size % tp_size:
            raise ValueError(f"tensor_parallel_size {tp_size} must divide intermediate_size {config.intermediate_size}")
        step = VOCAB_DIVISIBLE_BY * tp_size
        return cls(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, num_heads=heads,
                   num_kv_heads=kv_heads, head_dim=head_dim, ffn_hidden_size=config.intermediate_size,
                   vocab_size=config.vocab_size, padded_vocab_size=math.ceil(config.vocab_size / step) * step,
                   tied_embeddings=bool(config.tie_word_embeddings), qkv_bias=qkv_bias, norm_eps=config.rms_norm_eps,
                   rope_theta=float(theta if theta is not None else 10000.0),
                   max_positions=config.max_position_embeddings,
                   attention_dropout=float(getattr(config, "attention_dropout", 0.0)), tp_size=tp_size)

    def vocab_range(self, rank: int) -> tuple[int, int]:
        """The padded-vocabulary rows ``[start, end)`` rank ``rank`` holds."""
        per_rank = self.padded_vocab_size // self.tp_size
        return rank * per_rank, (rank + 1) * per_rank


def megatron_names(spec: GPTSpec) -> list[str]:
    """Every parameter name of the megatron model, in model order."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(spec.num_layers):
        p = f"decoder.layers.{i}."
        names += [p + "input_layernorm.weight", p + "self_attention.linear_qkv.weight"]
        names += [p + "self_attention.linear_qkv.bias"] if spec.qkv_bias else []
        names += [p + "self_attention.linear_proj.weight", p + "pre_mlp_layernorm.weight",
                  p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
    names.append("decoder.final_layernorm.weight")
    if not spec.tied_embeddings:
        names.append("output_layer.weight")
    return names


def hf_names_of(name: str) -> list[str]:
    """The Hugging Face tensors one megatron parameter is made of (for freeze / learning-rate globs)."""
    if name == "embedding.word_embeddings.weight":
        return ["model.embed_tokens.weight"]
    if name == "output_layer.weight":
        return ["lm_head.weight"]
    if name == "decoder.final_layernorm.weight":
        return ["model.norm.weight"]
    _, _, layer, rest = name.split(".", 3)
    p = f"model.layers.{layer}."
    kind = rest.rsplit(".", 1)[-1]  # weight | bias
    return {"input_layernorm.weight": [p + "input_layernorm.weight"],
            "pre_mlp_layernorm.weight": [p + "post_attention_layernorm.weight"],
            "self_attention.linear_qkv.weight": [f"{p}self_attn.{x}_proj.{kind}" for x in "qkv"],
            "self_attention.linear_qkv.bias": [f"{p}self_attn.{x}_proj.{kind}" for x in "qkv"],
            "self_attention.linear_proj.weight": [p + "self_attn.o_proj.weight"],
            "mlp.linear_fc1.weight": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
            "mlp.linear_fc2.weight": [p + "mlp.down_proj.weight"]}[rest]


def partition_dim(name: str) -> int | None:
    """The dimension along which megatron parameter ``name`` is split over ranks; None when replicated."""
    if name.endswith("layernorm.weight"):
        return None
    return 1 if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else 0


# --- HF -> megatron -------------------------------------------------------------------------------------------

def _qkv(spec: GPTSpec, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Full interleaved QKV ``[g * (n/g + 2) * d, ...]`` from HF's q ``[n*d, ...]``, k, v ``[g*d, ...]``."""
    g, d = spec.num_kv_heads, spec.head_dim
    rest = q.shape[1:]
    q = q.reshape(g, spec.num_heads // g * d, *rest)
    return torch.cat([q, k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1).reshape(-1, *rest)


def _pad_vocab(spec: GPTSpec, weight: Tensor) -> Tensor:
    pad = spec.padded_vocab_size - weight.shape[0]
    return torch.cat([weight, weight.new_zeros(pad, *weight.shape[1:])]) if pad else weight


def hf_to_megatron(hf: Mapping[str, Tensor], spec: GPTSpec, rank: int) -> dict[str, Tensor]:
    """Rank ``rank``'s megatron parameters from a full HF state dict (``hf`` may load tensors lazily)."""
    t = spec.tp_size

    def rows(x: Tensor) -> Tensor:  # column-parallel: output rows split
        return x.chunk(t, dim=0)[rank].clone()

    def cols(x: Tensor) -> Tensor:  # row-parallel: input columns split
        return x.chunk(t, dim=1)[rank].clone()

    out = {"embedding.word_embeddings.weight": rows(_pad_vocab(spec, hf["model.embed_tokens.weight"]))}
    for i in range(spec.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = h + "self_attn."
        out[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"].clone()
        out[m + "self_attention.linear_qkv.weight"] = rows(_qkv(spec, *(hf[f"{attn}{x}_proj.weight"] for x in "qkv")))
        if spec.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = rows(_qkv(spec, *(hf[f"{attn}{x}_proj.bias"] for x in "qkv")))
        out[m + "self_attention.linear_proj.weight"] = cols(hf[attn + "o_proj.weight"])
        out[m + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"].clone()
        out[m + "mlp.linear_fc1.weight"] = torch.cat([rows(hf[h + "mlp.gate_proj.weight"]),
                                                      rows(hf[h + "mlp.up_proj.weight"])])
        out[m + "mlp.linear_fc2.weight"] = cols(hf[h + "mlp.down_proj.weight"])
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"].clone()
    if not spec.tied_embeddings:
        out["output_layer.weight"] = rows(_pad_vocab(spec, hf["lm_head.weight"]))
    return out


# --- megatron -> HF -------------------------------------------------------------------------------------------

def merge_to_hf(name: str, shards: Sequence[Tensor], spec: GPTSpec) -> dict[str, Tensor]:
    """The HF tensors of megatron parameter ``name`` from its shards on ranks 0..t-1 (replicated: any shard)."""
    if name.endswith("layernorm.weight"):
        return dict.fromkeys(hf_names_of(name), shards[0])
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        full = torch.cat(list(shards))[:spec.vocab_size].clone()  # its own storage, without the padding
        names = ["model.embed_tokens.weight"] + (["lm_head.weight"] if spec.tied_embeddings else [])
        return dict.fromkeys(names if name.startswith("embedding") else ["lm_head.weight"], full)
    hf_names = hf_names_of(name)
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        g, d = spec.num_kv_heads, spec.head_dim
        full = torch.cat(list(shards))
        rest = full.shape[1:]
        q, k, v = full.reshape(g, -1, *rest).split([spec.num_heads // g * d, d, d], dim=1)
        return dict(zip(hf_names, (q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest))))
    if name.endswith("linear_fc1.weight"):
        halves = [s.chunk(2, dim=0) for s in shards]
        return dict(zip(hf_names, (torch.cat([a for a, _ in halves]), torch.cat([b for _, b in halves]))))
    return {hf_names[0]: torch.cat(list(shards), dim=1)}  # linear_proj, linear_fc2: row-parallel


def megatron_to_hf(shards: Sequence[Mapping[str, Tensor]], spec: GPTSpec) -> dict[str, Tensor]:
    """The full HF state dict from every rank's megatron parameters (``shards[r]`` is rank r's).

    With tied embeddings both ``model.embed_tokens.weight`` and ``lm_head.weight`` are given (as transformers'
    ``state_dict()`` does); the checkpoint writer drops the tied copy.
    """
    out: dict[str, Tensor] = {}
    for name in megatron_names(spec):
        out.update(merge_to_hf(name, [s[name] for s in shards], spec))
    return out
