"""Chat templating: samples into prompt token ids (for generation) and SFT token ids with a loss mask."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from lingshu_rl.data.sample import Sample


class PromptTooLong(ValueError):
    pass


def _ids(encoded: Any) -> list[int]:
    """``apply_chat_template(tokenize=True)`` returns a list or a BatchEncoding depending on the version."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, sample: Sample, max_tokens: int | None = None) -> list[int]:
    """The prompt turns of ``sample`` with the assistant generation prompt appended."""
    messages = [m for m in sample.messages if m["role"] != "assistant"] if sample.messages[-1]["role"] == "assistant" \
        else sample.messages
    ids = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    if max_tokens is not None and len(ids) > max_tokens:
        raise PromptTooLong(f"sample {sample.id!r}: prompt has {len(ids)} tokens, more than the limit {max_tokens} "
                            "(data.max_prompt_tokens)")
    return ids


def encode_sft(tokenizer: PreTrainedTokenizerBase, sample: Sample) -> tuple[list[int], list[int]]:
    """Prompt ids and target ids of a sample whose last message is the assistant turn to learn.

    The target is the assistant text followed by the end-of-turn token, so the model learns to stop.
    """
    if not sample.messages or sample.messages[-1]["role"] != "assistant":
        raise ValueError(f"sample {sample.id!r} has no final assistant message to learn")
    prompt = encode_prompt(tokenizer, sample)
    full = _ids(tokenizer.apply_chat_template(sample.messages, tokenize=True))
    if full[:len(prompt)] != prompt:
        raise ValueError(f"sample {sample.id!r}: the chat template does not extend the prompt with the answer")
    target = full[len(prompt):]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id
    if end in target:  # drop whatever the template adds after the end-of-turn token (e.g. a newline)
        target = target[:target.index(end) + 1]
    return prompt, target
