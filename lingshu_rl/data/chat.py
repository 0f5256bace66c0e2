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


def chat_messages(sample: Sample) -> list[dict[str, Any]]:
    """``sample.messages`` as the chat template takes them: with images, one ``{"type": "image"}`` item per image
    at the start of the first user turn (the Qwen2-VL / Qwen2.5-VL layout), the text after them."""
    if not sample.images:
        return sample.messages
    messages = [dict(m) for m in sample.messages]
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError(f"sample {sample.id!r} has images but no user message to put them in")
    content = first_user["content"]
    text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    first_user["content"] = [{"type": "image"} for _ in sample.images] + text
    return messages


def encode_prompt(tokenizer: PreTrainedTokenizerBase, sample: Sample, max_tokens: int | None = None) -> list[int]:
    """The prompt turns of ``sample`` with the assistant generation prompt appended."""
    messages = chat_messages(sample)
    if messages[-1]["role"] == "assistant":
        messages = [m for m in messages if m["role"] != "assistant"]
    ids = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    if max_tokens is not None and len(ids) > max_tokens:
        raise PromptTooLong(f"sample {sample.id!r}: prompt has {len(ids)} tokens, more than the limit {max_tokens} "
                            "(data.max_prompt_tokens)")
    return ids


def _end_of_turn(tokenizer: PreTrainedTokenizerBase) -> int:
    if "<|im_end|>" in tokenizer.get_vocab():
        # transformers types the result ``int | list[int]`` (it also takes a list); one token gives one id
        return tokenizer.convert_tokens_to_ids("<|im_end|>")  # type: ignore[return-value]
    return tokenizer.eos_token_id


def encode_conversation(tokenizer: PreTrainedTokenizerBase, sample: Sample, max_length: int | None = None
                        ) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a loss mask that is 1 on assistant tokens only.

    Multi-turn aware: every assistant turn (its text and its end-of-turn token) is learnt; system and user
    turns, and the template's assistant header, are not. Each assistant turn is located by rendering the
    conversation up to it with and without that turn, so any template that renders a prefix consistently
    works. Longer conversations are cut at ``max_length`` (the mask follows the cut).
    """
    if not any(m["role"] == "assistant" for m in sample.messages):
        raise ValueError(f"sample {sample.id!r} has no assistant message to learn")
    end = _end_of_turn(tokenizer)
    messages = chat_messages(sample)
    ids: list[int] = []
    mask: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _ids(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True))
        through = _ids(tokenizer.apply_chat_template(messages[:i + 1], tokenize=True))
        if before[:len(ids)] != ids or through[:len(before)] != before:
            raise ValueError(f"sample {sample.id!r}: the chat template does not render turn {i} as an extension "
                             "of the conversation before it")
        turn = through[len(before):]
        if end in turn:  # whatever the template adds after the end-of-turn token belongs to the next turn
            turn = turn[:turn.index(end) + 1]
        mask += [0] * (len(before) - len(ids)) + [1] * len(turn)
        ids = before + turn
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask
