"""Adapters between lingshu rewards and the two reward contracts users already have code for.

- verl: ``compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict``
  (a dict carries ``score`` plus logged extras).
- TRL: ``f(prompts, completions, completion_ids=None, **columns) -> list[float | None]``, batched, where
  completions are strings or, for chat data, ``[{"role": "assistant", "content": ...}]`` lists.

``adapt_foreign`` recognises either contract by its parameter names, so ``--reward my_verl_file.py:compute_score``
just works; ``to_verl`` and ``to_trl`` go the other way.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lingshu_rl.rewards.base import RewardFn, call_reward

# TRL passes these to every reward function; they are trainer objects, not sample columns.
_TRL_TRAINER_KWARGS = frozenset({"trainer_state", "log_extra", "log_metric", "environments"})


def _params(fn: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def is_verl_reward(fn: Callable[..., Any]) -> bool:
    return {"solution_str", "ground_truth"} <= _params(fn)


def is_trl_reward(fn: Callable[..., Any]) -> bool:
    return "completions" in _params(fn)


def adapt_foreign(fn: Callable[..., Any]) -> RewardFn:
    """Return ``fn`` as a lingshu reward, wrapping verl- or TRL-style functions."""
    if is_verl_reward(fn):
        return from_verl(fn)
    if is_trl_reward(fn):
        return from_trl(fn)
    return fn


def _completion_text(completion: Any) -> str:
    """TRL completions are plain strings or a list of chat messages (take the assistant text)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"cannot read a completion of type {type(completion).__name__}: {completion!r:.80}")


def from_verl(compute_score: Callable[..., Any]) -> RewardFn:
    """A verl ``compute_score`` function as a lingshu reward."""
    accepted = _params(compute_score)

    @functools.wraps(compute_score)
    def reward(response: str, answer: Any, **fields: Any) -> Any:
        extra_info = {k: v for k, v in fields.items() if k not in ("data_source", "source")}
        kwargs = {"data_source": fields.get("data_source", fields.get("source", "")), "solution_str": response,
                  "ground_truth": answer, "extra_info": extra_info}
        return compute_score(**{k: v for k, v in kwargs.items() if k in accepted})

    return reward


def from_trl(reward_func: Callable[..., Any], conversational: bool = True) -> RewardFn:
    """A TRL reward function as a lingshu reward, called with a batch of one.

    ``conversational`` chooses how the completion is shown to it: as ``[{"role": "assistant", "content": ...}]``
    (what TRL passes for chat data sets, and what TRL's own rewards index) or as a plain string.
    A ``None`` result (TRL's "not applicable") scores 0 and is flagged with the sub-score ``not_applicable``.
    """

    @functools.wraps(reward_func)
    def reward(response: str, answer: Any, **fields: Any) -> Any:
        completion: Any = [{"role": "assistant", "content": response}] if conversational else response
        prompt = fields.pop("prompt", "")
        columns = {k: [v] for k, v in fields.items()}
        columns.setdefault("solution", [answer])  # TRL's accuracy rewards name the gold column "solution"
        columns["answer"] = [answer]
        out = reward_func(prompts=[prompt], completions=[completion], completion_ids=[None], **columns)
        value = list(out)[0]
        if value is None:
            return {"score": 0.0, "not_applicable": 1.0}
        return value

    return reward


def _as_reward(reward: RewardFn | str) -> RewardFn:
    if isinstance(reward, str):
        from lingshu_rl.rewards.combine import build_reward  # a reference or a weighted expression

        return build_reward(reward)
    return reward


def to_verl(reward: RewardFn | str) -> Callable[..., dict[str, float]]:
    """A lingshu reward (or reference) as a verl ``compute_score``; returns ``{"score", **sub_scores}``."""
    fn = _as_reward(reward)

    def compute_score(data_source: str, solution_str: str, ground_truth: Any,
                      extra_info: Mapping[str, Any] | None = None, **_: Any) -> dict[str, float]:
        fields = {**(extra_info or {}), "data_source": data_source, "source": data_source}
        result = call_reward(fn, solution_str, ground_truth, fields)
        return {"score": result.score, **result.details}

    return compute_score


def to_trl(reward: RewardFn | str, answer_column: str = "answer") -> Callable[..., list[float]]:
    """A lingshu reward (or reference) as a TRL reward function.

    The gold answer is read from the data set column ``answer_column`` (``solution`` and ``ground_truth`` are
    accepted as fallbacks); every other column is passed to the reward as a field.
    """
    fn = _as_reward(reward)

    def reward_func(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                    **columns: Any) -> list[float]:
        columns = {k: v for k, v in columns.items() if k not in _TRL_TRAINER_KWARGS}
        for name in (answer_column, "solution", "ground_truth"):
            if name in columns:
                answers = columns.pop(name)
                break
        else:
            raise KeyError(f"the data set has no {answer_column!r} column (columns: {sorted(columns)})")
        scores = []
        for i, completion in enumerate(completions):
            fields = {k: v[i] for k, v in columns.items()}
            fields["prompt"] = prompts[i]
            scores.append(call_reward(fn, _completion_text(completion), answers[i], fields).score)
        return scores

    reward_func.__name__ = getattr(fn, "__name__", "lingshu_reward")
    return reward_func

