"""MedQA (USMLE, US, English, 4 options), test split, in the original release's JSON lines.

Format: ``phrases_no_exclude_test.jsonl`` (jind11/MedQA ``data_clean/questions/US/4_options/``), one object per
line: ``question``, ``options`` ({"A".."D": text}), ``answer_idx`` (the gold letter), ``answer`` (the gold
option's text; checked to equal ``options[answer_idx]``), ``meta_info`` (``step1`` | ``step2&3``),
``metamap_phrases`` (unused).
Id: the file has none, so the 0-based position of the record ("0" .. "1272").
Subset labels: ``step`` (= ``meta_info``).
Full file: 1273 items (step1 679, step2&3 594).
"""

from __future__ import annotations

from pathlib import Path

from lingshu_rl.eval.benchmarks.base import BenchmarkError, read_json_lines, require
from lingshu_rl.eval.items import EvalItem

FOLDER = "medqa_usmle_4opt"
FILES = ("phrases_no_exclude_test.jsonl",)
COUNT = 1273
HF_ID = "GBaker/MedQA-USMLE-4-options"


def read(root: Path) -> list[EvalItem]:
    path = root / FILES[0]
    items = []
    for position, (line_no, row) in enumerate(read_json_lines(path)):
        where = f"{path}:{line_no}"
        require(row, ("question", "options", "answer_idx", "meta_info"), where)
        options = {str(k): str(v) for k, v in row["options"].items()}
        gold = str(row["answer_idx"])
        if gold not in options or ("answer" in row and row["answer"] != options[gold]):
            raise BenchmarkError(f"{where}: answer_idx {gold!r} does not name the answer among the options")
        items.append(EvalItem(id=str(position), benchmark="medqa", task="mcq", question=row["question"],
                              answer=gold, options=options, subsets={"step": str(row["meta_info"])}))
    return items
