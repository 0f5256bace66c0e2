"""The sample record every stage shares (SFT, GRPO, evaluation)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

TASK_KINDS = ("mcq", "closed", "open")


@dataclass
class Sample:
    """One training or evaluation item.

    ``messages`` is the chat prompt (system/user turns, OpenAI style ``{"role", "content"}``); for SFT it may
    end with the assistant turn(s) to learn. ``answer`` is the gold answer: an option letter for ``mcq``,
    ``yes``/``no``/``maybe`` for ``closed``, free text for ``open``.
    """

    id: str
    messages: list[dict[str, Any]]
    answer: str
    options: dict[str, str] | None = None  # letter -> option text, for multiple choice
    task: str = "mcq"  # one of TASK_KINDS
    images: list[str | bytes] = field(default_factory=list)  # paths or encoded bytes (multimodal samples)
    source: str = ""  # data set name, e.g. "medqa"; passed to rewards as ``data_source``
    meta: dict[str, Any] = field(default_factory=dict)  # subset labels and anything else

    def reward_fields(self) -> dict[str, Any]:
        """The keyword fields a reward function may ask for. ``images`` are the images' paths, an embedded image
        ``"<image: N bytes>"``: a reward item never carries pixels (it goes to a scoring process n times a prompt)."""
        images = [i if isinstance(i, str) else f"<image: {len(i)} bytes>" for i in self.images]
        return {"options": self.options, "id": self.id, "task": self.task, "source": self.source,
                "data_source": self.source, "images": images, **self.meta}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
