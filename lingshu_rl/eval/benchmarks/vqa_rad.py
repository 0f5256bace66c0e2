"""VQA-RAD, the official test split, in the original OSF release's JSON.

Format: ``VQA_RAD Dataset Public.json``, a list of 2248 objects: ``qid``, ``phrase_type`` (freeform | para |
test_freeform | test_para), ``image_name`` (in ``VQA_RAD Image Folder/``), ``image_organ`` (HEAD | CHEST |
ABD), ``question``, ``question_type`` (PRES, POS, ABN, ...; some combined, "POS, PRES"), ``answer``,
``answer_type`` (OPEN | CLOSED), and rephrasing/linking fields (unused).
Split: the test set is ``phrase_type`` in {test_freeform, test_para}.
Quirks handled: 5 answers are JSON integers (read as text), two ``answer_type`` values carry a trailing space,
one ``qid`` is a string.
Task: ``closed`` when the gold answer is yes/no, else ``open`` (so "right or left?" gets a short-answer prompt).
Id: ``qid``.
Subset labels: ``answer_type`` (OPEN | CLOSED, as the papers report), ``organ``, ``question_type``,
``phrase_type``.
Full file: 451 test items (272 CLOSED / 179 OPEN) on 203 images.
"""

from __future__ import annotations

from pathlib import Path

from lingshu_rl.eval.benchmarks.base import is_yes_no, read_json, require
from lingshu_rl.eval.items import EvalItem

FOLDER = "vqa_rad"
FILES = ("VQA_RAD Dataset Public.json",)
IMAGE_FOLDER = "VQA_RAD Image Folder"
COUNT = 451
HF_ID = "flaviagiammarino/vqa-rad"
TEST_PHRASE_TYPES = ("test_freeform", "test_para")


def read(root: Path) -> list[EvalItem]:
    path = root / FILES[0]
    items = []
    for position, row in enumerate(read_json(path)):
        require(row, ("qid", "phrase_type", "image_name", "image_organ", "question", "question_type", "answer",
                      "answer_type"), f"{path}: record {position}")
        if row["phrase_type"] not in TEST_PHRASE_TYPES:
            continue
        answer = str(row["answer"]).strip()
        items.append(EvalItem(
            id=str(row["qid"]), benchmark="vqa_rad", task="closed" if is_yes_no(answer) else "open",
            question=row["question"], answer=answer, images=[f"{IMAGE_FOLDER}/{row['image_name']}"],
            subsets={"answer_type": str(row["answer_type"]).strip(), "organ": str(row["image_organ"]),
                     "question_type": str(row["question_type"]), "phrase_type": str(row["phrase_type"])}))
    return items
