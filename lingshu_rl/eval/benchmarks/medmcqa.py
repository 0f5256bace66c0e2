"""MedMCQA dev (validation) set, in the original release's format.

Format: ``dev.json`` -- JSON lines despite the extension, one object per line: ``id`` (a UUID), ``question``,
``opa`` .. ``opd`` (options A-D), ``cop`` (the correct option, 1-based: 1 = opa .. 4 = opd; the Hugging Face
copy is 0-based and is refused here), ``choice_type`` (single | multi), ``exp``, ``subject_name``,
``topic_name``.
Id: the file's ``id``.
Subset labels: ``subject`` (= ``subject_name``, 21 values), ``choice_type``.
Full file: 4183 items (cop 1/2/3/4: 1348/1085/925/825).
"""

from __future__ import annotations

from pathlib import Path

from lingshu_rl.eval.benchmarks.base import BenchmarkError, read_json_lines, require
from lingshu_rl.eval.items import EvalItem

FOLDER = "medmcqa_dev"
FILES = ("dev.json",)
COUNT = 4183
HF_ID = "openlifescienceai/medmcqa"


def read(root: Path) -> list[EvalItem]:
    path = root / FILES[0]
    items = []
    for line_no, row in read_json_lines(path):
        where = f"{path}:{line_no}"
        require(row, ("id", "question", "opa", "opb", "opc", "opd", "cop", "subject_name", "choice_type"), where)
        if row["cop"] not in (1, 2, 3, 4):
            raise BenchmarkError(f"{where}: cop {row['cop']!r} is not 1-4 (the original file is 1-based; "
                                 "the Hugging Face copy's 0-based cop is not this format)")
        options = {letter: str(row[f"op{key}"]) for letter, key in zip("ABCD", "abcd")}
        items.append(EvalItem(id=str(row["id"]), benchmark="medmcqa", task="mcq", question=row["question"],
                              answer="ABCD"[row["cop"] - 1], options=options,
                              subsets={"subject": str(row["subject_name"]), "choice_type": str(row["choice_type"])}))
    return items
