"""The evaluation item: one benchmark question in a common form, whatever the original file format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EVAL_TASKS = ("mcq", "closed", "open", "report")


@dataclass
class EvalItem:
    """One benchmark item.

    ``task`` decides the prompt and the scoring rule (see :mod:`lingshu_rl.eval.scoring`): ``mcq`` (``answer``
    is the gold option letter), ``closed`` (a yes/no question; ``answer`` is ``yes`` or ``no``), ``open``
    (``answer`` is the gold short answer) or ``report`` (``answer`` is the reference report).
    """

    id: str  # the original id where the file has one, else the 0-based position in the original file
    benchmark: str
    task: str  # one of EVAL_TASKS
    question: str
    answer: str
    options: dict[str, str] | None = None  # letter -> option text (mcq)
    context: str = ""  # a passage shown before the question (PubMedQA's abstract)
    images: list[str] = field(default_factory=list)  # paths relative to the data directory
    subsets: dict[str, str] = field(default_factory=dict)  # subset labels, e.g. {"subject": "anatomy"}
    messages: list[dict[str, Any]] | None = None  # a ready-made chat prompt (the demo); None: the default prompt

    def __post_init__(self) -> None:
        if self.task not in EVAL_TASKS:
            raise ValueError(f"item {self.id!r}: task {self.task!r} is not one of {', '.join(EVAL_TASKS)}")

    def to_row(self) -> dict[str, Any]:
        """The ``export`` row: empty optional fields are left out."""
        row: dict[str, Any] = {"id": self.id, "benchmark": self.benchmark, "task": self.task,
                               "question": self.question}
        if self.context:
            row["context"] = self.context
        if self.options is not None:
            row["options"] = self.options
        row["answer"] = self.answer
        row["images"] = self.images
        row["subsets"] = self.subsets
        if self.messages is not None:
            row["messages"] = self.messages
        return row
