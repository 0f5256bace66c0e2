"""SLAKE 1.0, the test split, in the original release's JSON; English by default (``slake``), Chinese as
``slake_zh``.

Format: ``test.json``, a list of objects: ``qid``, ``img_id``, ``img_name`` (relative to ``imgs/``, e.g.
``xmlab102/source.jpg``), ``question``, ``answer``, ``q_lang`` (en | zh), ``answer_type`` (OPEN | CLOSED),
``modality``, ``location``, ``content_type``, ``base_type``, ``triple``.
Task: ``closed`` when the gold answer is yes/no (是/是的/否/不是 in Chinese), else ``open`` (Chinese closed
questions answered with a verb, 有/没有/包含/不包含, are not yes/no replies and get the short-answer prompt).
Id: ``qid``.
Subset labels: ``answer_type``, ``modality``, ``location``, ``content_type``.
Full file: 2094 items = 1061 English (645 OPEN / 416 CLOSED, 96 images) + 1033 Chinese.
"""

from __future__ import annotations

from pathlib import Path

from lingshu_rl.eval.benchmarks.base import is_yes_no, read_json, require
from lingshu_rl.eval.items import EvalItem

FOLDER = "slake_test"
FILES = ("test.json",)
COUNTS = {"en": 1061, "zh": 1033}
HF_ID = "BoKelvin/SLAKE"


def read(root: Path, lang: str = "en") -> list[EvalItem]:
    path = root / FILES[0]
    items = []
    for position, row in enumerate(read_json(path)):
        require(row, ("qid", "img_name", "question", "answer", "q_lang", "answer_type", "modality", "location",
                      "content_type"), f"{path}: record {position}")
        if row["q_lang"] != lang:
            continue
        answer = str(row["answer"]).strip()
        items.append(EvalItem(
            id=str(row["qid"]), benchmark="slake" if lang == "en" else f"slake_{lang}",
            task="closed" if is_yes_no(answer) else "open",
            question=row["question"], answer=answer, images=[f"imgs/{row['img_name']}"],
            subsets={key: str(row[key]) for key in ("answer_type", "modality", "location", "content_type")}))
    return items
