"""The HF <-> megatron converter on its own (pure tensor code: runs without megatron-core or processes).

Shapes per rank, the exact round trip of every tensor for TP 1/2/4, and the layouts written out by hand for a
small case. The logits of converted models against transformers are checked in test_megatron_engine.py.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lingshu_rl.train.megatron.convert import (GPTSpec, hf_names_of, hf_to_megatron, megatron_names,
                                               megatron_to_hf, partition_dim)


def qwen2_untied() -> Qwen2ForCausalLM:
    """Untied embeddings, qkv biases, a vocabulary that needs padding (1000 -> 1024 at TP 2)."""
    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return randomised(Qwen2ForCausalLM(config))


def llama_mqa() -> LlamaForCausalLM:
    """Llama with one key/value head (fewer groups than TP ranks), head_dim != hidden/heads, tied embeddings."""
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    return randomised(LlamaForCausalLM(config))


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every tensor random (HF initialises biases to 0 and norms to 1, which would hide layout mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


@pytest.mark.parametrize("build", [qwen2_untied, llama_mqa])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_round_trip_is_exact(build, tp: int) -> None:
    model = build()
    hf = model.state_dict()
    spec = GPTSpec.from_hf(model.config, tp)
    shards = [hf_to_megatron(hf, spec, r) for r in range(tp)]
    assert all(list(s) == megatron_names(spec) for s in shards)
    for name in megatron_names(spec):  # split parameters: 1/t each; replicated ones: identical everywhere
        dim = partition_dim(name)
        if dim is None:
            assert all(torch.equal(s[name], shards[0][name]) for s in shards)
        else:
            assert sum(s[name].shape[dim] for s in shards) == (
                spec.padded_vocab_size if "embedding" in name or "output_layer" in name else
                sum(hf[h].shape[dim] for h in hf_names_of(name, spec)))
    back = megatron_to_hf(shards, spec)
    assert set(back) == set(hf)
    for key, tensor in hf.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_vocab_padding_and_split() -> None:
    spec = GPTSpec.from_hf(qwen2_untied().config, 2)
    assert (spec.vocab_size, spec.padded_vocab_size) == (1000, 1024)
    assert spec.vocab_range(0) == (0, 512) and spec.vocab_range(1) == (512, 1024)
    hf = qwen2_untied().state_dict()
    rank1 = hf_to_megatron(hf, spec, 1)["output_layer.weight"]
    assert torch.equal(rank1[:488], hf["lm_head.weight"][512:]) and not rank1[488:].any()  # 24 zero rows


def test_qkv_and_swiglu_layout_by_hand() -> None:
    """GQA 4 heads / 2 groups, head_dim 16, TP 2: rank r gets group r as [q heads 2r, 2r+1; k head r; v head r];
    fc1 on rank r is [gate rows of r; up rows of r]."""
    model = qwen2_untied()
    hf = model.state_dict()
    spec = GPTSpec.from_hf(model.config, 2)
    p, d = "model.layers.1.", 16
    for r in range(2):
        mega = hf_to_megatron(hf, spec, r)
        q, k, v = (hf[f"{p}self_attn.{x}_proj.weight"] for x in "qkv")
        want = torch.cat([q[2 * r * d:(2 * r + 2) * d], k[r * d:(r + 1) * d], v[r * d:(r + 1) * d]])
        assert torch.equal(mega["decoder.layers.1.self_attention.linear_qkv.weight"], want)
        bias = torch.cat([hf[f"{p}self_attn.q_proj.bias"][2 * r * d:(2 * r + 2) * d],
                          hf[f"{p}self_attn.k_proj.bias"][r * d:(r + 1) * d],
                          hf[f"{p}self_attn.v_proj.bias"][r * d:(r + 1) * d]])
        assert torch.equal(mega["decoder.layers.1.self_attention.linear_qkv.bias"], bias)
        gate, up = hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]
        assert torch.equal(mega["decoder.layers.1.mlp.linear_fc1.weight"],
                           torch.cat([gate[r * 48:(r + 1) * 48], up[r * 48:(r + 1) * 48]]))
        assert torch.equal(mega["decoder.layers.1.mlp.linear_fc2.weight"],
                           hf[p + "mlp.down_proj.weight"][:, r * 48:(r + 1) * 48])


def test_names_cover_every_hf_tensor_once() -> None:
    for build, tied in ((qwen2_untied, False), (llama_mqa, True)):
        model = build()
        spec = GPTSpec.from_hf(model.config, 1)
        covered = [h for name in megatron_names(spec) for h in hf_names_of(name, spec)]
        assert len(covered) == len(set(covered))
        assert set(covered) | ({"lm_head.weight"} if tied else set()) == set(model.state_dict())


def test_unsupported_configs_raise() -> None:
    with pytest.raises(ValueError, match="must divide"):
        GPTSpec.from_hf(qwen2_untied().config, 3)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=1,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    with pytest.raises(ValueError, match="RoPE scaling"):
        GPTSpec.from_hf(config, 1)
    with pytest.raises(ValueError, match="not 'gpt2'"):
        GPTSpec.from_hf(type("C", (), {"model_type": "gpt2"})(), 1)
