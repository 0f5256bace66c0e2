"""Normalised free-text answer matching: the ``answer_norm`` reward and :func:`answers_match` (for evaluation).

The predicted answer is taken from the response by :func:`extract_answer_text`: reasoning in ``<think>`` is
dropped, then the content of the last ``<answer>...</answer>``, else the last ``\\boxed{...}``, else the rest of
the line after the last answer phrase ("the answer is", "Final answer:", "答案是", "答案："), else the whole
response. It is compared with the gold answer (or each of a list of acceptable answers):

* ``exact`` -- equal after :func:`~lingshu_rl.rewards.normalize.normalize_text` (case, punctuation, articles,
  whitespace, full-width characters);
* ``yes_no`` -- the same yes/no/maybe after synonym mapping ("Yes, because..." counts as yes);
* ``numeric`` -- both parse as quantities (:func:`~lingshu_rl.rewards.normalize.parse_quantity`) with equal
  exact values and the same unit. When both sides are quantities this verdict is final: "-5" is not "5",
  and fuzzy matching cannot turn "6 mg" into "5 mg";
* ``fuzzy_ratio`` -- only when ``fuzzy`` is set: rapidfuzz ``ratio`` of the normalised strings in [0, 1]; a
  match when ``>= fuzzy`` (``fuzzy`` is on the same 0-1 scale; a value above 1 is read as percent, 85 -> 0.85).

Returned sub-scores (each the best over the gold answers): ``exact``, ``yes_no``, ``numeric``, ``fuzzy_ratio``
(only with ``fuzzy``), and ``extracted`` (1.0 when an answer tag, box or answer phrase delimited the answer,
0.0 when the whole response was used). ``score`` is 1.0 when any gold answer matches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rapidfuzz import fuzz

from lingshu_rl.rewards.normalize import (
    canonical_yes_no,
    last_boxed,
    last_tag_content,
    nfkc,
    normalize_text,
    parse_quantity,
    quantities_equal,
    strip_think,
    unwrap_latex,
)
from lingshu_rl.rewards.registry import register

_MARKER = re.compile(
    r"\b(?:final\s+|correct\s+)?answer(?:\s+to\s+(?:this|the)\s+question)?\s*"
    r"(?:(?:is|would\s+be|should\s+be)\b\s*[:：]?|[:：])"
    r"|(?:最终|正确)?答案\s*(?:是|为)\s*[:：]?|(?:最终|正确)?答案\s*[:：]", re.I)
_MARKDOWN = re.compile(r"\*\*|__|`+|^[ \t]*#+[ \t]*", re.M)
_QUOTES = " \t\n\"'“”‘’"


def _trim(text: str) -> str:
    """Quotes and whitespace at both ends, a closing full stop (not the leading dot of ".50")."""
    return text.strip(_QUOTES).rstrip(".。!！").strip(_QUOTES)


def extract_answer_text(response: str) -> tuple[str, bool]:
    """The answer part of ``response`` and whether a tag/box/answer phrase delimited it (see module docstring)."""
    text = _MARKDOWN.sub("", strip_think(nfkc(response)))
    for content in (last_tag_content(text, "answer"), last_boxed(text)):
        if content is not None:
            return _trim(unwrap_latex(content)), True
    markers = list(_MARKER.finditer(text))
    if markers:
        rest = text[markers[-1].end():]
        line, _, after = rest.partition("\n")
        if not line.strip(" \t:："):
            line = next((ln for ln in after.split("\n") if ln.strip()), "")
        return _trim(unwrap_latex(line)), True
    return _trim(text), False


def _threshold(fuzzy: float) -> float:
    return fuzzy / 100.0 if fuzzy > 1 else float(fuzzy)


def match_details(pred: str, gold: str, fuzzy: float | None = None) -> dict[str, float]:
    """Compare an already-extracted prediction with one gold answer; ``score`` plus the sub-scores."""
    pred_norm, gold_norm = normalize_text(pred), normalize_text(gold)
    pred_q, gold_q = parse_quantity(pred), parse_quantity(gold)
    gold_yes_no = canonical_yes_no(gold)
    details = {
        "exact": float(bool(gold_norm) and pred_norm == gold_norm),
        "yes_no": float(gold_yes_no is not None and canonical_yes_no(pred, leading=True) == gold_yes_no),
        "numeric": float(pred_q is not None and gold_q is not None and quantities_equal(pred_q, gold_q)),
    }
    if pred_q is not None and gold_q is not None:
        match = bool(details["numeric"])
    else:
        match = bool(details["exact"] or details["yes_no"])
    if fuzzy is not None:
        ratio = fuzz.ratio(pred_norm, gold_norm) / 100.0 if pred_norm and gold_norm else 0.0
        details["fuzzy_ratio"] = ratio
        if pred_q is None or gold_q is None:
            match = match or ratio >= _threshold(fuzzy)
    return {"score": float(match), **details}


def _golds(answer: object) -> list[str]:
    """One gold answer or several (a list, tuple or numpy array of acceptable answers); ``None`` entries dropped."""
    if hasattr(answer, "tolist") and not isinstance(answer, str):
        answer = answer.tolist()
    answers = list(answer) if isinstance(answer, (list, tuple, set, frozenset)) else [answer]
    return [str(a) for a in answers if a is not None]


def answers_match(pred: str, gold: str | Sequence[str], fuzzy: float | None = None) -> bool:
    """Whether an extracted prediction matches the gold answer (or any of a list of them)."""
    return any(match_details(pred, g, fuzzy)["score"] == 1.0 for g in _golds(gold))


@register("answer_norm")
def answer_norm(response: str, answer: str | Sequence[str], *, fuzzy: float | None = None,
                **_: object) -> dict[str, float]:
    """1.0 when the extracted answer matches the gold answer (or one of them); see the module docstring."""
    pred, extracted = extract_answer_text(response)
    results = [match_details(pred, g, fuzzy) for g in _golds(answer)] or [match_details(pred, "", fuzzy)]
    best = {key: max(r[key] for r in results) for key in results[0]}
    return {**best, "extracted": float(extracted)}
