"""MMLU medical: the six medical subjects of the MMLU test split, in the original CSV files.

Format: ``test/<subject>_test.csv`` for the subjects in :data:`SUBJECTS` (hendrycks/test ``data.tar``); CSV
with NO header row and six columns: question, option A, B, C, D, gold letter.
Id: ``<subject>-<0-based row position in that subject's file>``, e.g. ``anatomy-0``.
Subset labels: ``subject``.
Full files: 1089 items (anatomy 135, clinical_knowledge 265, college_biology 144, college_medicine 173,
medical_genetics 100, professional_medicine 272). Kept as released: some medical_genetics options read "1.0/64".
"""

from __future__ import annotations

import csv
from pathlib import Path

from lingshu_rl.eval.benchmarks.base import BenchmarkError
from lingshu_rl.eval.items import EvalItem

SUBJECTS = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
            "professional_medicine")
FOLDER = "mmlu_medical"
FILES = tuple(f"test/{subject}_test.csv" for subject in SUBJECTS)
COUNT = 1089
HF_ID = "cais/mmlu"


def read(root: Path) -> list[EvalItem]:
    items = []
    for subject, name in zip(SUBJECTS, FILES):
        path = root / name
        if not path.is_file():
            raise BenchmarkError(f"MMLU medical: {path} is missing (all six subject files are needed)")
        with path.open(encoding="utf-8", newline="") as handle:
            for position, row in enumerate(csv.reader(handle)):
                if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                    raise BenchmarkError(f"{path}: row {position + 1} is not question, A, B, C, D, gold letter")
                items.append(EvalItem(id=f"{subject}-{position}", benchmark="mmlu_medical", task="mcq",
                                      question=row[0], answer=row[5].strip(), options=dict(zip("ABCD", row[1:5])),
                                      subsets={"subject": subject}))
    return items
