"""The default prompt of each task kind, and evaluation items as chat :class:`~lingshu_rl.data.sample.Sample`\\ s.

One user turn, no system prompt (the model's own chat template applies)::

    mcq     [Context:\\n<context>\\n\\n]Question: <question>\\nOptions:\\nA. <text>\\nB. <text>...\\n<MCQ instruction>
    closed  <question>\\n<closed instruction>         (yes/no questions)
    open    <question>\\n<open instruction>           (short answers)
    report  <question>                               (the report benchmark's question is the instruction)

The instructions are in :data:`INSTRUCTIONS`, in Chinese for a question written in Chinese (SLAKE zh). Items
with a ready-made prompt (the demo) keep their own messages. An item's images are listed in
``Sample.images`` as paths under the data directory; a missing image is an error naming item and path.
"""

from __future__ import annotations

import re
from pathlib import Path

from lingshu_rl.data.sample import Sample
from lingshu_rl.eval.benchmarks.base import BenchmarkError
from lingshu_rl.eval.items import EvalItem

INSTRUCTIONS: dict[str, dict[str, str]] = {
    "en": {"mcq": "Answer with the letter of the correct option.",
           "closed": "Answer yes or no.",
           "open": "Answer with a single word or a short phrase."},
    "zh": {"mcq": "请用正确选项的字母回答。",
           "closed": "请回答是或否。",
           "open": "请用一个词或短语回答。"},
}
_CJK = re.compile(r"[\u4e00-\u9fff]")


def prompt_text(item: EvalItem) -> str:
    """The user turn of ``item``'s default prompt (see the module docstring)."""
    if item.task == "report":
        return item.question
    instruction = INSTRUCTIONS["zh" if _CJK.search(item.question) else "en"][item.task]
    if item.task != "mcq":
        return f"{item.question}\n{instruction}"
    lines = [f"Context:\n{item.context}\n"] if item.context else []
    lines += [f"Question: {item.question}", "Options:"]
    lines += [f"{letter}. {text}" for letter, text in (item.options or {}).items()]
    lines.append(instruction)
    return "\n".join(lines)


def resolve_images(item: EvalItem, data_dir: Path | None) -> list[str]:
    """Absolute paths of ``item``'s images; raise naming the item and path when one is missing."""
    paths = []
    for image in item.images:
        path = (data_dir / image) if data_dir is not None else Path(image)
        if not path.is_file():
            raise BenchmarkError(f"{item.benchmark} item {item.id}: image not found: {path}")
        paths.append(str(path.resolve()))
    return paths


def to_sample(item: EvalItem, data_dir: Path | None) -> Sample:
    """``item`` as a chat sample: its messages (own or default prompt), gold, options, images, labels."""
    messages = item.messages if item.messages is not None else [{"role": "user", "content": prompt_text(item)}]
    images: list[str | bytes] = list(resolve_images(item, data_dir))
    return Sample(id=item.id, messages=messages, answer=item.answer, options=item.options,
                  task="open" if item.task == "report" else item.task, images=images,
                  source=item.benchmark, meta=dict(item.subsets))
