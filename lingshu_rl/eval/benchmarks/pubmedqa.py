"""PubMedQA PQA-L (expert-labelled), the official 500-item test split, in the original release's files.

Format (pubmedqa/pubmedqa ``data/``): ``ori_pqal.json`` maps PMID -> {``QUESTION``, ``CONTEXTS`` (abstract
sections), ``LABELS``, ``MESHES``, ``YEAR``, ``final_decision`` (yes | no | maybe), ``LONG_ANSWER``, ...} for all
1000 items; ``test_ground_truth.json`` maps the 500 test PMIDs -> yes | no | maybe and defines the split
(its order is kept; each label is checked against ``final_decision``).
Item: the question with the abstract sections (joined by newlines) as context, options A. yes / B. no /
C. maybe (as MedEvalKit asks it), gold = the letter.
Id: the PMID.
Subset labels: ``decision`` (the gold label: per-class accuracy; "maybe" is the hard class).
Full files: 500 test items (yes 276 / no 169 / maybe 55).
"""

from __future__ import annotations

from pathlib import Path

from lingshu_rl.eval.benchmarks.base import BenchmarkError, read_json, require
from lingshu_rl.eval.items import EvalItem

FOLDER = "pubmedqa_pqal"
FILES = ("ori_pqal.json", "test_ground_truth.json")
COUNT = 500
HF_ID = "qiaojin/PubMedQA"
OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
_LETTER = {text: letter for letter, text in OPTIONS.items()}


def read(root: Path) -> list[EvalItem]:
    records, gold = read_json(root / FILES[0]), read_json(root / FILES[1])
    items = []
    for pmid, label in gold.items():
        where = f"{root / FILES[1]}: PMID {pmid}"
        if pmid not in records:
            raise BenchmarkError(f"{where} is not in {FILES[0]}")
        record = records[pmid]
        require(record, ("QUESTION", "CONTEXTS", "final_decision"), f"{root / FILES[0]}: PMID {pmid}")
        if label not in _LETTER or record["final_decision"] != label:
            raise BenchmarkError(f"{where}: label {label!r} is not yes/no/maybe or differs from final_decision "
                                 f"{record['final_decision']!r}")
        items.append(EvalItem(id=str(pmid), benchmark="pubmedqa", task="mcq", question=record["QUESTION"],
                              answer=_LETTER[label], options=dict(OPTIONS), context="\n".join(record["CONTEXTS"]),
                              subsets={"decision": label}))
    return items
