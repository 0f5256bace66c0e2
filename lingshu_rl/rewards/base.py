"""The reward contract: a plain function from one response (and its sample's fields) to a score.

A reward is any callable ``fn(response, answer, **fields)`` returning either a number or a mapping with a
``"score"`` key plus named sub-scores (the same shape verl's ``compute_score`` may return). ``fields`` are
the sample's other columns: ``options`` (letter -> text), ``id``, ``task``, ``source``, ... A reward takes
only the fields it names; the caller drops the rest (see :func:`call_reward`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

RewardFn = Callable[..., "float | Mapping[str, float] | RewardResult"]


@dataclass(frozen=True)
class RewardResult:
    """A score plus named sub-scores that are logged under the reward's name."""

    score: float
    details: dict[str, float] = field(default_factory=dict)


class RewardValueError(ValueError):
    """A reward returned something that is not a finite number (NaN, inf, a string, None...)."""


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RewardValueError(f"{what} is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise RewardValueError(f"{what} is not finite: {number}")
    return number


def to_result(value: Any) -> RewardResult:
    """Normalise what a reward returned into a :class:`RewardResult`; reject non-finite scores."""
    if isinstance(value, RewardResult):
        return RewardResult(_finite(value.score, "score"), dict(value.details))
    if isinstance(value, Mapping):
        if "score" not in value:
            raise RewardValueError(f"a reward returned a mapping without a 'score' key: keys {sorted(value)}")
        details = {}
        for key, sub in value.items():
            if key == "score":
                continue
            try:
                details[str(key)] = float(sub)
            except (TypeError, ValueError):
                continue  # non-numeric extras (e.g. the extracted text) are not logged as metrics
        return RewardResult(_finite(value["score"], "score"), details)
    return RewardResult(_finite(value, "score"))


def _accepted_fields(fn: Callable[..., Any]) -> tuple[frozenset[str], bool]:
    """Names ``fn`` accepts as keywords, and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return frozenset(), True
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    names = frozenset(
        p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    return names, takes_var_kw


def call_reward(fn: RewardFn, response: str, answer: Any, fields: Mapping[str, Any] | None = None) -> RewardResult:
    """Call ``fn`` with the response, the gold answer and whichever sample fields it accepts."""
    names, takes_var_kw = _accepted_fields(fn)
    extra = {k: v for k, v in (fields or {}).items()
             if k not in ("response", "answer") and (takes_var_kw or k in names)}
    return to_result(fn(response, answer, **extra))
