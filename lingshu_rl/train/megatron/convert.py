"""Hugging Face <-> megatron-core GPTModel weights, per tensor-parallel rank (Qwen2 / Qwen2.5 / Llama, Qwen2.5-VL).

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
Qwen2.5-VL: the language model converts as above from its ``model.language_model.*`` tensors (transformers' names;
``HFCheckpoint`` reads files written with the older ``model.layers.*`` / ``visual.*`` names under them too); the
vision tower and merger are Hugging Face modules replicated on every rank: ``model.visual.X`` <-> ``visual.X``,
unchanged (:mod:`lingshu_rl.train.megatron.vision`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

VOCAB_DIVISIBLE_BY = 128  # megatron's convention: Vp is a multiple of 128 * t
VISION_MODELS = ("qwen2_5_vl",)
HF_VISION = "model.visual."  # the vision tower's Hugging Face prefix; its megatron-side prefix is "visual."


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
    mrope_section: tuple[int, ...]  # rotary frequencies per (time, height, width) position row
    vision: bool = False  # a vision-language model: a vision tower rides along (model.visual.*)
    lm_prefix: str = "model."  # the language model's Hugging Face prefix ("model.language_model." for VL)

    @classmethod
    def from_hf(cls, config: Any, tp_size: int) -> GPTSpec:
        """Check that ``config`` is a supported architecture and read it; unsupported features raise."""
        kind = config.model_type
        if kind not in ("qwen2", "llama", *VISION_MODELS):
            raise ValueError(f"the megatron engine converts Qwen2/Qwen2.5/Llama and Qwen2.5-VL checkpoints, "
                             f"not {kind!r}")
        vision = kind in VISION_MODELS
        text = config.get_text_config() if vision else config
        act = getattr(text, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{kind}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
        rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope" if vision else "default"):
            raise ValueError(f"{kind}: RoPE scaling {rope_type!r} is not supported by the converter")
        theta = rope.get("rope_theta", getattr(text, "rope_theta", None))
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        mrope = tuple(rope.get("mrope_section") or ()) if vision else (head_dim // 2, 0, 0)
        if vision and (len(mrope) != 3 or sum(mrope) != head_dim // 2):
            raise ValueError(f"{kind}: mrope_section {list(mrope)} must be three sizes summing to head_dim/2 "
                             f"({head_dim // 2})")
        if kind == "llama":
            if getattr(config, "mlp_bias", False) or getattr(config, "attention_bias", False):
                raise ValueError("llama: attention_bias/mlp_bias are not supported")
        elif getattr(text, "use_sliding_window", False):
            raise ValueError(f"{kind}: sliding-window attention is not supported")
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        if heads % tp_size or (kv_heads % tp_size and tp_size % kv_heads):
            raise ValueError(f"tensor_parallel_size {tp_size} must divide the {heads} attention heads and divide "
                             f"(or be a multiple of) the {kv_heads} key/value heads")
        if text.intermediate_size % tp_size:
            raise ValueError(f"tensor_parallel_size {tp_size} must divide intermediate_size {text.intermediate_size}")
        step = VOCAB_DIVISIBLE_BY * tp_size
        tied = getattr(config, "tie_word_embeddings", None)
        return cls(num_layers=text.num_hidden_layers, hidden_size=text.hidden_size, num_heads=heads,
                   num_kv_heads=kv_heads, head_dim=head_dim, ffn_hidden_size=text.intermediate_size,
                   vocab_size=text.vocab_size, padded_vocab_size=math.ceil(text.vocab_size / step) * step,
                   tied_embeddings=bool(tied if tied is not None else text.tie_word_embeddings),
                   qkv_bias=kind != "llama", norm_eps=text.rms_norm_eps,
                   rope_theta=float(theta if theta is not None else 10000.0),
                   max_positions=text.max_position_embeddings,
                   attention_dropout=float(getattr(text, "attention_dropout", 0.0)), tp_size=tp_size,
                   mrope_section=mrope, vision=vision, lm_prefix="model.language_model." if vision else "model.")

    def vocab_range(self, rank: int) -> tuple[int, int]:
        """The padded-vocabulary rows ``[start, end)`` rank ``rank`` holds."""
        per_rank = self.padded_vocab_size // self.tp_size
        return rank * per_rank, (rank + 1) * per_rank


def megatron_names(spec: GPTSpec) -> list[str]:
    """Every parameter name of the megatron language model, in model order (a vision tower's come on top)."""
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


def hf_names_of(name: str, spec: GPTSpec) -> list[str]:
    """The Hugging Face tensors one megatron parameter is made of (for freeze / learning-rate globs)."""
    m = spec.lm_prefix
    if name.startswith("visual."):
        return [HF_VISION + name.removeprefix("visual.")]
    if name == "embedding.word_embeddings.weight":
        return [m + "embed_tokens.weight"]
    if name == "output_layer.weight":
        return ["lm_head.weight"]
    if name == "decoder.final_layernorm.weight":
        return [m + "norm.weight"]
    _, _, layer, rest = name.split(".", 3)
    p = f"{m}layers.{layer}."
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
    if name.endswith("layernorm.weight") or name.startswith("visual."):
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

    lm = spec.lm_prefix
    out = {"embedding.word_embeddings.weight": rows(_pad_vocab(spec, hf[lm + "embed_tokens.weight"]))}
    for i in range(spec.num_layers):
        h, m = f"{lm}layers.{i}.", f"decoder.layers.{i}."
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
    out["decoder.final_layernorm.weight"] = hf[lm + "norm.weight"].clone()
    if not spec.tied_embeddings:
        out["output_layer.weight"] = rows(_pad_vocab(spec, hf["lm_head.weight"]))
    if spec.vision:  # replicated on every rank, Hugging Face's own layout
        out.update({"visual." + k.removeprefix(HF_VISION): hf[k].clone() for k in hf if k.startswith(HF_VISION)})
    return out


# --- megatron -> HF -------------------------------------------------------------------------------------------

def merge_to_hf(name: str, shards: Sequence[Tensor], spec: GPTSpec) -> dict[str, Tensor]:
    """The HF tensors of megatron parameter ``name`` from its shards on ranks 0..t-1 (replicated: any shard)."""
    if partition_dim(name) is None:  # norms, the vision tower
        return dict.fromkeys(hf_names_of(name, spec), shards[0])
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        full = torch.cat(list(shards))[:spec.vocab_size].clone()  # its own storage, without the padding
        names = [spec.lm_prefix + "embed_tokens.weight"] + (["lm_head.weight"] if spec.tied_embeddings else [])
        return dict.fromkeys(names if name.startswith("embedding") else ["lm_head.weight"], full)
    hf_names = hf_names_of(name, spec)
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
    """The full HF state dict from every rank's megatron parameters (``shards[r]`` is rank r's, a vision tower's
    included).

    With tied embeddings both ``model.embed_tokens.weight`` and ``lm_head.weight`` are given (as transformers'
    ``state_dict()`` does); the checkpoint writer drops the tied copy.
    """
    out: dict[str, Tensor] = {}
    for name in shards[0]:
        out.update(merge_to_hf(name, [s[name] for s in shards], spec))
    return out


def canonical_name(stored: str, spec: GPTSpec) -> str:
    """A checkpoint tensor's name as this converter reads it: Qwen2.5-VL files written with the older names
    (``model.layers.*``, ``visual.*``, as the released checkpoints are) under transformers' current ones."""
    if not spec.vision or stored.startswith(("model.language_model.", HF_VISION)):
        return stored
    if stored.startswith("visual."):
        return HF_VISION + stored.removeprefix("visual.")
    return spec.lm_prefix + stored.removeprefix("model.") if stored.startswith("model.") else stored
