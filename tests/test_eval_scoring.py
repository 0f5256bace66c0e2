"""Scoring rules (and where they deliberately differ from MedEvalKit), and the per-benchmark summary."""

from __future__ import annotations

import pytest

from lingshu_rl.eval.items import EvalItem
from lingshu_rl.eval.results import summarize
from lingshu_rl.eval.scoring import score_item, score_items

MCQ = EvalItem(id="q1", benchmark="medqa", task="mcq", question="Which drug reverses heparin?", answer="A",
               options={"A": "Protamine sulfate", "B": "Vitamin K", "C": "Idarucizumab", "D": "Andexanet alfa"},
               subsets={"step": "step1"})
CLOSED = EvalItem(id="c1", benchmark="vqa_rad", task="closed", question="Is there a mass?", answer="No",
                  subsets={"answer_type": "CLOSED"})
OPEN = EvalItem(id="o1", benchmark="vqa_rad", task="open", question="Which lung?", answer="left lung",
                subsets={"answer_type": "OPEN"})


@pytest.mark.parametrize("response, correct, method", [
    ("The answer is A.", True, "marker"),
    ("<answer>Protamine sulfate</answer>", True, "answer_tag"),
    ("\\boxed{B}", False, "boxed"),
    ("A", True, "bare"),
])
def test_mcq_uses_the_reward_extraction(response, correct, method):
    score = score_item(MCQ, response)
    assert (score.correct, score.method) == (correct, method)


@pytest.mark.parametrize("response", [
    "I cannot answer medical questions.",  # MedEvalKit would pick the most similar option
    "It is either A or C.",  # a hedge
    "",
    "Let me think step by step about heparin and its antidote, which",  # cut off before answering
])
def test_mcq_without_an_extracted_answer_is_wrong_no_similarity_fallback(response):
    score = score_item(MCQ, response)
    assert score.correct is False and score.extracted is None and score.method == "none"


@pytest.mark.parametrize("response, correct", [
    ("No", True), ("no.", True), ("The answer is no.", True), ("No, there is no mass.", True),
    ("<answer>no</answer>", True), ("Yes", False),
    ("There is no abnormality.", False),  # MedEvalKit: contains "no" and not "yes" -> counted as "no"
    ("I don't know", False),  # MedEvalKit: "know" contains "no"
])
def test_closed_reads_an_explicit_yes_or_no(response, correct):
    assert score_item(CLOSED, response).correct is correct


def test_open_matches_normalised_answers_and_reports_token_f1():
    right = score_item(OPEN, "The Left Lung.")  # MedEvalKit's exact match: "the left lung." != "left lung"
    assert right.correct is True and right.metrics == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    partial = score_item(OPEN, "Answer: left lower lung")
    assert partial.correct is False and partial.extracted == "left lower lung"
    assert partial.metrics["recall"] == 1.0 and partial.metrics["precision"] == pytest.approx(2 / 3)
    numeric = EvalItem(id="n", benchmark="vqa_rad", task="open", question="How many?", answer="2")
    assert score_item(numeric, "2.0").correct is True and score_item(numeric, "3").correct is False


def test_missing_prediction_is_wrong_and_listed_unknown_ids_are_listed():
    items = [MCQ, CLOSED, OPEN]
    scores = score_items(items, {"q1": "A", "o1": "left lung"})
    assert [s.correct for s in scores] == [True, False, True] and scores[1].method == "missing"
    result = summarize("mixed", "Mixed", items, scores, unknown=["zz"])
    assert result["n"] == 3 and result["correct"] == 2 and result["accuracy"] == pytest.approx(2 / 3)
    assert result["missing"] == ["c1"] and result["unknown"] == ["zz"]
    assert result["extracted"] == 1.0  # of the answered items
    low, high = result["ci95"]
    assert 0 < low < 2 / 3 < high < 1
    assert result["subsets"]["task"]["closed"]["accuracy"] == 0.0  # several task kinds: per-task accuracy
    assert result["subsets"]["answer_type"]["OPEN"]["n"] == 1
    assert result["open"] == {"n": 1, "precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_reports_get_text_metrics_not_accuracy():
    refs = ["The heart size is normal. The lungs are clear.", "Mild cardiomegaly. No effusion."]
    items = [EvalItem(id=str(i), benchmark="reports", task="report", question="Write the report.", answer=ref)
             for i, ref in enumerate(refs)]
    perfect = summarize("reports", "Reports", items, score_items(items, {"0": refs[0], "1": refs[1]}), [])
    assert perfect["accuracy"] is None
    assert perfect["report"]["bleu4"] == pytest.approx(1.0) and perfect["report"]["rouge_l"] == pytest.approx(1.0)
    assert perfect["report"]["cider"] == pytest.approx(10.0)
    half = summarize("reports", "Reports", items, score_items(items, {"0": "<think>x</think>" + refs[0]}), [])
    assert half["missing"] == ["1"] and half["report"]["rouge_l"] == pytest.approx(0.5)
