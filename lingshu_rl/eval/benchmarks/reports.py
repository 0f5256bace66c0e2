"""Radiology report generation: reference reports in the layouts the field distributes them in.

The first of these files found in the folder is read:

* ``annotation.json`` -- R2Gen's split file for IU X-Ray and MIMIC-CXR: {"train"|"val"|"test": [{``id``,
  ``report``, ``image_path`` (list, relative to ``images/``), ``split``}]}. The ``test`` list is read.
  Id: the record's ``id``.
* ``test.json`` -- MedEvalKit's layout (IU-Xray, MIMIC-CXR, CheXpert Plus): a list of {``findings``,
  ``impression``, ``image`` (a path or a list, relative to ``images/``)}. As in MedEvalKit, records whose
  findings and impression are both empty are skipped and the reference is
  "Findings: {findings} Impression: {impression}." with an empty section written "None" (and no doubled
  final full stop).
  Id: the record's 0-based position in the list (skipped records keep their numbers free).
* ``ground_truth.csv`` -- MedEvalKit's report-metrics CSV: a header row ``study_id,report``; no images.
  Id: ``study_id``.

Subset labels: none. Item counts: no report file is in the shared data, so none is asserted here; R2Gen's
splits have 590 test reports (IU X-Ray) and 3858 (MIMIC-CXR).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lingshu_rl.eval.benchmarks.base import BenchmarkError, read_json, require
from lingshu_rl.eval.items import EvalItem

FOLDER = "reports"
FILES = ("annotation.json", "test.json", "ground_truth.csv")
HF_ID = None
QUESTION = "Write the radiology report for the image(s)."


def _item(item_id: str, report: str, images: list[str]) -> EvalItem:
    return EvalItem(id=item_id, benchmark="reports", task="report", question=QUESTION, answer=report.strip(),
                    images=images)


def _r2gen(path: Path) -> list[EvalItem]:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("test"), list):
        raise BenchmarkError(f"{path}: expected R2Gen's {{'test': [...]}} layout")
    items = []
    for position, row in enumerate(data["test"]):
        require(row, ("id", "report", "image_path"), f"{path}: test record {position}")
        items.append(_item(str(row["id"]), row["report"], [f"images/{p}" for p in row["image_path"]]))
    return items


def _section(text: Any) -> str:
    return str(text or "").strip() or "None"


def _medevalkit(path: Path) -> list[EvalItem]:
    items = []
    for position, row in enumerate(read_json(path)):
        require(row, ("findings", "impression", "image"), f"{path}: record {position}")
        if _section(row["findings"]) == _section(row["impression"]) == "None":
            continue
        images = row["image"] if isinstance(row["image"], list) else [row["image"]]
        report = f"Findings: {_section(row['findings'])} Impression: {_section(row['impression']).rstrip('.')}."
        items.append(_item(str(position), report, [f"images/{p}" for p in images]))
    return items


def _csv(path: Path) -> list[EvalItem]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"study_id", "report"} <= set(reader.fieldnames or ()):
            raise BenchmarkError(f"{path}: expected a header with study_id and report")
        return [_item(row["study_id"], row["report"], []) for row in reader]


def read(root: Path) -> list[EvalItem]:
    for name, reader in zip(FILES, (_r2gen, _medevalkit, _csv)):
        if (root / name).is_file():
            return reader(root / name)
    raise BenchmarkError(f"reports: none of {', '.join(FILES)} in {root}")
