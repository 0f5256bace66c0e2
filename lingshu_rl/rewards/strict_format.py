"""The strict reasoning-format reward, registered as ``format``.

Score 1.0 only when the whole response is ``<think>...</think>`` followed by ``<answer>...</answer>``, with
nothing but whitespace before, between and after, each of the four tags exactly once, and a non-empty answer.
The tag names are configurable; ``think_tag=None`` requires the answer block alone. An empty think block is
accepted unless ``allow_empty_think=False`` (Qwen3's non-thinking mode writes ``<think>\\n\\n</think>``).

Sub-scores: ``has_think`` (exactly one opening and one closing think tag, in that order; absent when
``think_tag`` is ``None``) and ``has_answer`` (the same for the answer tag, with non-blank content). They can
be 1.0 while the score is 0.0 (e.g. text outside the blocks, or the answer before the think block).
"""

from __future__ import annotations

import functools
import re

from lingshu_rl.rewards.registry import register


@functools.lru_cache(maxsize=16)
def _layout(think_tag: str | None, answer_tag: str) -> re.Pattern[str]:
    answer = rf"<{re.escape(answer_tag)}>(?P<answer>.*?)</{re.escape(answer_tag)}>"
    think = rf"<{re.escape(think_tag)}>(?P<think>.*?)</{re.escape(think_tag)}>\s*" if think_tag else ""
    return re.compile(rf"\s*{think}{answer}\s*", re.S)


def _single_block(text: str, tag: str) -> str | None:
    """The content of the one ``<tag>...</tag>`` block, or ``None`` unless each tag occurs exactly once, in order."""
    opening, closing = f"<{tag}>", f"</{tag}>"
    if text.count(opening) != 1 or text.count(closing) != 1:
        return None
    start, end = text.index(opening) + len(opening), text.index(closing)
    return text[start:end] if start <= end else None


@register("format")
def strict_format(response: str, answer: object = None, *, think_tag: str | None = "think",
                  answer_tag: str = "answer", allow_empty_think: bool = True, **_: object) -> dict[str, float]:
    """1.0 for exactly ``<think>...</think><answer>...</answer>`` (see the module docstring); ``answer`` is unused."""
    text = "" if response is None else str(response)
    answer_body = _single_block(text, answer_tag)
    result = {"has_answer": float(answer_body is not None and answer_body.strip() != "")}
    ok = bool(result["has_answer"])
    if think_tag:
        think_body = _single_block(text, think_tag)
        result["has_think"] = float(think_body is not None and (allow_empty_think or think_body.strip() != ""))
        ok = ok and bool(result["has_think"])
    ok = ok and _layout(think_tag, answer_tag).fullmatch(text) is not None
    return {"score": float(ok), **result}
