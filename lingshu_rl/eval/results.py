"""Scores into results: accuracy with its 95% Wilson interval, overall and per subset label, and the
open-answer and report metrics; plus reading a predictions file.

A benchmark's result (one entry of ``results.json``'s ``benchmarks``)::

    {"benchmark", "title", "n", "correct", "accuracy", "ci95": [low, high],
     "extracted": share of responses from which an answer was read,
     "missing": [ids without a prediction, counted wrong], "unknown": [prediction ids not in the benchmark],
     "subsets": {label: {value: {"n", "correct", "accuracy", "ci95"}}},
     "open": {"n", "precision", "recall", "f1"},                 # when it has open items
     "report": {"n", "bleu1".."bleu4", "rouge_l", "cider"},       # report benchmarks (accuracy is null)
     "notes": [...]}
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from lingshu_rl.eval.items import EvalItem
from lingshu_rl.eval.metrics import corpus_bleu, report_tokens, wilson_interval
from lingshu_rl.eval.scoring import ItemScore
from lingshu_rl.telemetry.jsonl import list_problems, numbered_lines


class PredictionsError(ValueError):
    """A malformed predictions file; the message names every bad line."""


def load_predictions(path: Path) -> dict[str, str]:
    """``id -> response`` from a JSONL file of ``{"id", "response"}`` rows (ids compared as strings)."""
    predictions: dict[str, str] = {}
    problems = []
    for line_no, row in numbered_lines(path):
        if isinstance(row, json.JSONDecodeError):
            problems.append(f"line {line_no}: not valid JSON ({row.msg})")
            continue
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("response"), str):
            problems.append(f"line {line_no}: expected an object with 'id' and a string 'response'")
            continue
        key = str(row["id"])
        if key in predictions:
            problems.append(f"line {line_no}: id {key!r} repeated")
            continue
        predictions[key] = row["response"]
    if problems:
        raise PredictionsError(f"{path}: {len(problems)} bad line(s), nothing was scored:" + list_problems(problems))
    return predictions


def accuracy_entry(correct: int, n: int) -> dict[str, Any]:
    low, high = wilson_interval(correct, n)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None, "ci95": [low, high]}


def _subsets(items: list[EvalItem], scores: list[ItemScore]) -> dict[str, dict[str, dict[str, Any]]]:
    tally: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    several_tasks = len({item.task for item in items}) > 1
    for item, score in zip(items, scores):
        labels = {"task": item.task, **item.subsets} if several_tasks else item.subsets
        for label, value in labels.items():
            tally[label][value][0] += bool(score.correct)
            tally[label][value][1] += 1
    return {label: {value: accuracy_entry(*counts) for value, counts in sorted(values.items())}
            for label, values in tally.items()}


def _mean(scores: list[ItemScore], key: str) -> float:
    return sum(s.metrics[key] for s in scores) / len(scores)


def summarize(name: str, title: str, items: list[EvalItem], scores: list[ItemScore], unknown: list[str],
              notes: list[str] | None = None) -> dict[str, Any]:
    """The result of one benchmark (see the module docstring); ``scores`` are aligned with ``items``."""
    graded = [(item, s) for item, s in zip(items, scores) if s.correct is not None]
    result: dict[str, Any] = {"benchmark": name, "title": title,
                              **accuracy_entry(sum(bool(s.correct) for _, s in graded), len(graded))}
    answered = [s for s in scores if s.method != "missing"]
    result["extracted"] = (sum(s.extracted is not None for s in answered) / len(answered)) if answered else None
    result["missing"] = [s.id for s in scores if s.method == "missing"]
    result["unknown"] = unknown
    result["subsets"] = _subsets([i for i, _ in graded], [s for _, s in graded]) if graded else {}
    open_scores = [s for item, s in zip(items, scores) if item.task == "open"]
    if open_scores:
        result["open"] = {"n": len(open_scores), **{k: _mean(open_scores, k) for k in ("precision", "recall", "f1")}}
    reports = [(item, s) for item, s in zip(items, scores) if item.task == "report"]
    if reports:
        bleu = corpus_bleu([report_tokens(s.extracted or "") for _, s in reports],
                           [report_tokens(item.answer) for item, _ in reports])
        report_scores = [s for _, s in reports]
        result["report"] = {"n": len(reports), **{f"bleu{i + 1}": b for i, b in enumerate(bleu)},
                            "rouge_l": _mean(report_scores, "rouge_l"), "cider": _mean(report_scores, "cider")}
    result["notes"] = list(notes or [])
    return result


def macro_average(results: dict[str, dict[str, Any]]) -> float | None:
    """The unweighted mean accuracy over benchmarks that have one (how the papers average)."""
    accs = [r["accuracy"] for r in results.values() if r.get("accuracy") is not None]
    return sum(accs) / len(accs) if accs else None
