"""Random-init Qwen2 models of a given shape for the benchmarks (the tiny demo model's tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch

Shape = tuple[int, int, int, int, int, int]  # hidden, layers, heads, kv heads, intermediate, vocab (0: the tokenizer's)


def build(name: str, shape: Shape | None, root: Path, dtype: torch.dtype = torch.float32) -> str:
    """The embedded tiny model when ``shape`` is None, else a random Qwen2 of that shape with untied embeddings
    (as Qwen2.5-7B's) and the tiny model's special tokens (end of turn ``<|im_end|>``, pad ``<|endoftext|>``),
    saved in ``dtype`` under ``root / name``."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from lingshu_rl.models.tiny import EOS_TOKEN, IM_END, build_tiny_model

    tiny = build_tiny_model()
    if shape is None:
        return str(tiny)
    hidden, layers, heads, kv, inter, vocab = shape
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab or len(tokenizer),
                         tie_word_embeddings=False, max_position_embeddings=2048, bos_token_id=None,
                         eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
                         pad_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN))
    path = root / name
    Qwen2ForCausalLM(config).to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
