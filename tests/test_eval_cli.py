"""``python -m lingshu_rl.eval`` export / score / compare / list, on fixtures and on the full real files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lingshu_rl.eval.benchmarks import BENCHMARKS
from lingshu_rl.eval.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
LAST_LINE = re.compile(r"accuracy: (\d\.\d{4}) \(95% CI (\d\.\d{4})-(\d\.\d{4}), n=(\d+)\)")


def export(name: str, data_dir: Path, out: Path) -> list[dict]:
    assert main(["export", "--benchmark", name, "--data-dir", str(data_dir), "--output", str(out)]) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def gold_predictions(rows: list[dict], path: Path) -> Path:
    """Each gold answer written as a model would: "The answer is C." / "The answer is yes."."""
    path.write_text("".join(json.dumps({"id": r["id"], "response": f"The answer is {r['answer']}."},
                                       ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def score(name: str, data_dir: Path, predictions: Path, out: Path, capsys) -> tuple[str, str]:
    assert main(["score", "--benchmark", name, "--data-dir", str(data_dir), "--predictions", str(predictions),
                 "--output-dir", str(out)]) == 0
    captured = capsys.readouterr()
    return captured.out.strip().splitlines()[-1], captured.err


def test_export_rows(tmp_path):
    rows = export("vqa_rad", FIXTURES, tmp_path / "items.jsonl")
    assert [r["id"] for r in rows] == ["1", "2", "3", "5"]
    assert rows[0] == {"id": "1", "benchmark": "vqa_rad", "task": "closed", "question": "Is there a midline shift?",
                       "answer": "No", "images": ["vqa_rad/VQA_RAD Image Folder/synpic100.jpg"],
                       "subsets": {"answer_type": "CLOSED", "organ": "HEAD", "question_type": "PRES",
                                   "phrase_type": "test_freeform"}}
    mcq = export("medqa", FIXTURES, tmp_path / "medqa.jsonl")[0]
    assert mcq["options"]["B"] == "Escherichia coli" and mcq["answer"] == "B"


@pytest.mark.parametrize("name", ["medqa", "medmcqa", "mmlu_medical", "pubmedqa", "vqa_rad", "slake", "slake_zh"])
def test_score_gold_answers_on_fixtures_is_100_percent(tmp_path, capsys, name):
    rows = export(name, FIXTURES, tmp_path / "items.jsonl")
    last, _ = score(name, FIXTURES, gold_predictions(rows, tmp_path / "preds.jsonl"), tmp_path / "out", capsys)
    assert LAST_LINE.fullmatch(last) and last.startswith("accuracy: 1.0000") and last.endswith(f"n={len(rows)})")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["benchmarks"][name]["accuracy"] == 1.0
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "accuracy.png").is_file()


def test_score_reports_missing_and_unknown_ids(tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    preds.write_text('{"id": "0", "response": "B"}\n{"id": 2, "response": "The answer is D."}\n'
                     '{"id": "99", "response": "A"}\n')
    last, err = score("medqa", FIXTURES, preds, tmp_path / "out", capsys)
    assert last == "accuracy: 0.3333 (95% CI 0.0615-0.7923, n=3)"  # the missing item counts as wrong
    assert "1 item(s) have no prediction and count as wrong: 1" in err
    assert "1 prediction id(s) are not in medqa and were ignored: 99" in err
    result = json.loads((tmp_path / "out" / "results.json").read_text())["benchmarks"]["medqa"]
    assert result["missing"] == ["1"] and result["unknown"] == ["99"]
    scored = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [(s["id"], s["correct"], s["method"]) for s in scored] == [
        ("0", True, "bare"), ("1", False, "missing"), ("2", False, "marker")]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "without a prediction, counted wrong: 1" in report and "| step1 | 2 |" in report


def test_score_rejects_malformed_predictions(tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    preds.write_text('{"id": "0", "response": "B"}\nnot json\n{"id": "0", "response": "C"}\n{"response": "x"}\n')
    assert main(["score", "--benchmark", "medqa", "--data-dir", str(FIXTURES), "--predictions", str(preds),
                 "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "line 2: not valid JSON" in err and "line 3: id '0' repeated" in err and "line 4: expected" in err


def test_report_benchmark_score_prints_text_metrics(tmp_path, capsys):
    data = FIXTURES / "reports_r2gen"
    rows = export("reports", data, tmp_path / "items.jsonl")
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": r["id"], "response": r["answer"]}) + "\n" for r in rows))
    last, _ = score("reports", data, preds, tmp_path / "out", capsys)
    assert last.startswith("report metrics: BLEU-1 1.0000, BLEU-4 1.0000, ROUGE-L 1.0000, CIDEr 10.0000")


def test_compare_writes_one_table_and_one_chart(tmp_path, capsys):
    rows = export("medqa", FIXTURES, tmp_path / "items.jsonl")
    score("medqa", FIXTURES, gold_predictions(rows, tmp_path / "gold.jsonl"), tmp_path / "grpo", capsys)
    (tmp_path / "none.jsonl").write_text("")
    score("medqa", FIXTURES, tmp_path / "none.jsonl", tmp_path / "base", capsys)
    assert main(["compare", "--results", f"base={tmp_path / 'base'}", "--results",
                 f"grpo={tmp_path / 'grpo' / 'results.json'}", "--output-dir", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| benchmark | base | grpo | grpo - base |" in table
    assert "| medqa | 0.00 (0.00-56.15) | 100.00 (43.85-100.00) | +100.00 |" in table
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 0
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["average"] == {"base": 0.0, "grpo": 1.0}


def test_list_names_every_benchmark(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BENCHMARKS) and "1273" in out


@pytest.mark.parametrize("name", [n for n, b in BENCHMARKS.items() if b.needs_data and b.count is not None])
def test_full_file_gold_answers_score_100_percent(shared_data, tmp_path, capsys, name):
    rows = export(name, shared_data, tmp_path / "items.jsonl")
    assert len(rows) == BENCHMARKS[name].count
    last, err = score(name, shared_data, gold_predictions(rows, tmp_path / "preds.jsonl"), tmp_path / "out", capsys)
    assert last.startswith("accuracy: 1.0000 (95% CI ") and last.endswith(f"n={BENCHMARKS[name].count})")
    assert err == ""
