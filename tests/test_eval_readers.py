"""Benchmark readers: each on its fixture (written in the original format), and on the full real file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lingshu_rl.eval.benchmarks import BENCHMARKS, load_items
from lingshu_rl.eval.benchmarks.base import BenchmarkError

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def by_id(name: str, data_dir: Path | None = FIXTURES) -> dict:
    return {item.id: item for item in load_items(name, data_dir)}


def test_medqa_fixture():
    items = by_id("medqa")
    assert list(items) == ["0", "1", "2"]  # no ids in the file: record positions (blank lines skipped)
    assert items["0"].answer == "B" and items["0"].options["B"] == "Escherichia coli"
    assert items["0"].subsets == {"step": "step2&3"} and items["0"].task == "mcq"


def test_medqa_rejects_inconsistent_gold(tmp_path):
    row = json.loads((FIXTURES / "medqa_usmle_4opt" / "phrases_no_exclude_test.jsonl").read_text().splitlines()[0])
    row["answer_idx"] = "A"
    (tmp_path / "phrases_no_exclude_test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(BenchmarkError, match=":1: answer_idx 'A'"):
        load_items("medqa", tmp_path)


def test_medmcqa_fixture_and_one_based_cop(tmp_path):
    items = by_id("medmcqa")
    assert [i.answer for i in items.values()] == ["A", "C", "D"]  # cop 1, 3, 4 (1-based)
    assert items["fixture-0002"].subsets == {"subject": "Pharmacology", "choice_type": "single"}
    row = json.loads((FIXTURES / "medmcqa_dev" / "dev.json").read_text().splitlines()[0])
    (tmp_path / "dev.json").write_text(json.dumps({**row, "cop": 0}) + "\n")
    with pytest.raises(BenchmarkError, match="1-based"):
        load_items("medmcqa", tmp_path)


def test_mmlu_fixture():
    items = by_id("mmlu_medical")
    assert len(items) == 7 and items["anatomy-1"].answer == "B"
    assert items["anatomy-0"].options["B"] == "weakness of facial muscles, and loss of taste."  # quoted comma
    assert items["clinical_knowledge-0"].question == 'A "normal" resting heart rate in adults is'
    assert items["medical_genetics-0"].options["A"] == "1.0/4"  # kept as written
    assert Counter(i.subsets["subject"] for i in items.values())["anatomy"] == 2


def test_mmlu_needs_all_subjects(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "anatomy_test.csv").write_text("q,a,b,c,d,A\n")
    with pytest.raises(BenchmarkError, match="clinical_knowledge_test.csv is missing"):
        load_items("mmlu_medical", tmp_path)


def test_pubmedqa_fixture():
    items = load_items("pubmedqa", FIXTURES)
    assert [i.id for i in items] == ["10003", "10001", "10002"]  # the test split, in its file's order
    first = items[0]
    assert first.options == {"A": "yes", "B": "no", "C": "maybe"} and first.answer == "C"
    assert first.context == "Results of trials are conflicting.\nFalls fell by 8% (95% CI -5% to 19%)."
    assert first.subsets == {"decision": "maybe"}


def test_vqa_rad_fixture():
    items = by_id("vqa_rad")
    assert list(items) == ["1", "2", "3", "5"]  # test_freeform / test_para only
    assert items["2"].answer == "2" and items["2"].task == "open"  # integer answer read as text
    assert items["3"].task == "open" and items["3"].subsets["answer_type"] == "CLOSED"  # "CLOSED " stripped
    assert items["1"].task == "closed"
    assert items["1"].images == ["vqa_rad/VQA_RAD Image Folder/synpic100.jpg"]  # relative to the data root
    assert items["5"].subsets == {"answer_type": "OPEN", "organ": "HEAD", "question_type": "POS",
                                  "phrase_type": "test_freeform"}


def test_vqa_rad_folder_as_data_dir():
    items = by_id("vqa_rad", FIXTURES / "vqa_rad")
    assert items["1"].images == ["VQA_RAD Image Folder/synpic100.jpg"]


def test_slake_fixture_languages():
    en, zh = by_id("slake"), by_id("slake_zh")
    assert list(en) == ["101", "102", "103"] and list(zh) == ["201", "202", "203"]
    assert en["102"].task == "closed" and en["103"].task == "open" and en["101"].task == "open"
    assert zh["202"].task == "closed" and zh["203"].task == "open"  # 包含 is not a yes/no reply
    assert en["101"].images == ["slake_test/imgs/xmlab1/source.jpg"]
    assert en["103"].subsets == {"answer_type": "CLOSED", "modality": "X-Ray", "location": "Chest_mediastinal",
                                 "content_type": "Position"}


def test_reports_three_layouts():
    r2gen = load_items("reports", FIXTURES / "reports_r2gen")
    assert [i.id for i in r2gen] == ["CXR1_1_IM-0001", "CXR2_1_IM-0002"]
    assert r2gen[0].images == ["images/CXR1_1_IM-0001/0.png", "images/CXR1_1_IM-0001/1.png"]
    assert r2gen[0].task == "report" and r2gen[1].answer.startswith("Mild cardiomegaly")
    medevalkit = load_items("reports", FIXTURES / "reports_medevalkit")
    assert [i.id for i in medevalkit] == ["0", "2"]  # the empty record 1 is skipped, ids stay positions
    assert medevalkit[1].answer == "Findings: None Impression: Cardiomegaly."
    assert medevalkit[1].images == ["images/p3.png", "images/p3b.png"]
    csv_items = load_items("reports", FIXTURES / "reports_csv")
    assert [i.id for i in csv_items] == ["study_1", "study_2"] and csv_items[0].images == []


def test_demo_needs_no_data():
    items = load_items("demo", None, limit=3)
    assert [i.id for i in items] == ["demo-heldout-0", "demo-heldout-1", "demo-heldout-2"]
    assert items[0].messages is not None and items[0].answer in items[0].options


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(BenchmarkError, match="--data-dir is required"):
        load_items("medqa", None)
    with pytest.raises(BenchmarkError, match="phrases_no_exclude_test.jsonl"):
        load_items("medqa", tmp_path)
    with pytest.raises(BenchmarkError, match="unknown benchmark 'nope'"):
        load_items("nope", tmp_path)


@pytest.mark.parametrize("name", [n for n, b in BENCHMARKS.items() if b.needs_data and b.count is not None])
def test_full_file_has_the_documented_count(shared_data, name):
    items = load_items(name, shared_data)
    assert len(items) == BENCHMARKS[name].count
    assert len({i.id for i in items}) == len(items)


def test_full_files_subset_counts(shared_data):
    assert Counter(i.subsets["step"] for i in load_items("medqa", shared_data)) == {"step1": 679, "step2&3": 594}
    assert Counter(i.subsets["subject"] for i in load_items("mmlu_medical", shared_data)) == {
        "anatomy": 135, "clinical_knowledge": 265, "college_biology": 144, "college_medicine": 173,
        "medical_genetics": 100, "professional_medicine": 272}
    assert Counter(i.subsets["decision"] for i in load_items("pubmedqa", shared_data)) == {
        "yes": 276, "no": 169, "maybe": 55}
    vqa = load_items("vqa_rad", shared_data)
    assert Counter(i.subsets["answer_type"] for i in vqa) == {"CLOSED": 272, "OPEN": 179}
    assert len({image for i in vqa for image in i.images}) == 203
    slake = load_items("slake", shared_data)
    assert Counter(i.subsets["answer_type"] for i in slake) == {"OPEN": 645, "CLOSED": 416}
    assert len({image for i in slake for image in i.images}) == 96
    assert Counter(i.answer for i in load_items("medmcqa", shared_data)) == {"A": 1348, "B": 1085, "C": 925, "D": 825}
