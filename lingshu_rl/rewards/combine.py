"""Reward specs from config or the command line, and weighted combinations of rewards.

``--reward mcq_exact``, ``--reward "0.5*format + 1.0*mcq_exact"`` and repeated ``--reward format=0.5
--reward mcq_exact`` all parse into a list of :class:`RewardSpec`. A combination scores
``sum(weight_i * score_i)`` and logs each part under its name (``format``, ``format/has_think``, ...).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lingshu_rl.rewards.base import RewardFn, RewardResult, call_reward
from lingshu_rl.rewards.registry import resolve_reward

_WEIGHT = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_TERM_WEIGHT_FIRST = re.compile(rf"^\s*({_WEIGHT})\s*\*\s*(.+?)\s*$")
_TERM_WEIGHT_LAST = re.compile(rf"^\s*(.+?)\s*=\s*({_WEIGHT})\s*$")


@dataclass
class RewardSpec:
    """One reward of the run: a reference (name, entry point, module or file), its weight, its options."""

    ref: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the reward function on every call

    @property
    def name(self) -> str:
        """Short name for logging: the function name of ``pkg.mod:fn`` / ``file.py:fn`` references."""
        return self.ref.rpartition(":")[2] if ":" in self.ref else self.ref


def parse_reward_arg(text: str) -> list[RewardSpec]:
    """Parse ``"mcq_exact"``, ``"0.5*format + 1.0*mcq_exact"`` or ``"format=0.5"`` into specs."""
    specs = []
    for term in (t for t in re.split(r"(?<![0-9][eE])\+", text) if t.strip()):
        if m := _TERM_WEIGHT_FIRST.match(term):
            specs.append(RewardSpec(m.group(2), float(m.group(1))))
        elif m := _TERM_WEIGHT_LAST.match(term):
            specs.append(RewardSpec(m.group(1), float(m.group(2))))
        else:
            specs.append(RewardSpec(term.strip()))
    if not specs:
        raise ValueError(f"empty reward specification: {text!r}")
    return specs


class WeightedReward:
    """``sum(w_i * reward_i)``; sub-scores are kept under each reward's name. A plain picklable callable."""

    def __init__(self, parts: Sequence[tuple[str, float, RewardFn]]):
        names = [name for name, _, _ in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique in a combination: {names}")
        self.parts = list(parts)
        self.__name__ = " + ".join(f"{w:g}*{n}" for n, w, _ in parts)

    def __call__(self, response: str, answer: Any, **fields: Any) -> RewardResult:
        total, details = 0.0, {}
        for name, weight, fn in self.parts:
            part = call_reward(fn, response, answer, fields)
            total += weight * part.score
            details[name] = part.score
            details.update({f"{name}/{key}": value for key, value in part.details.items()})
        return RewardResult(total, details)


def build_reward(specs: Sequence[RewardSpec] | str | RewardSpec) -> RewardFn:
    """Resolve specs into one reward function (a single unweighted reward is returned as itself)."""
    if isinstance(specs, str):
        specs = parse_reward_arg(specs)
    elif isinstance(specs, RewardSpec):
        specs = [specs]
    resolved = []
    for spec in specs:
        fn = resolve_reward(spec.ref)
        if spec.kwargs:
            fn = functools.update_wrapper(functools.partial(fn, **spec.kwargs), fn)
        resolved.append((spec.name, spec.weight, fn))
    if len(resolved) == 1 and resolved[0][1] == 1.0:
        return resolved[0][2]
    return WeightedReward(resolved)


def specs_from_config(entries: Sequence[Mapping[str, Any] | str]) -> list[RewardSpec]:
    """Config form: a list of names/expressions or ``{ref, weight, kwargs}`` mappings."""
    specs: list[RewardSpec] = []
    for entry in entries:
        if isinstance(entry, str):
            specs.extend(parse_reward_arg(entry))
            continue
        unknown = set(entry) - {"ref", "weight", "kwargs"}
        if unknown or "ref" not in entry:
            raise ValueError(f"a reward entry takes keys ref, weight, kwargs; got {sorted(entry)}")
        specs.append(RewardSpec(str(entry["ref"]), float(entry.get("weight", 1.0)), dict(entry.get("kwargs") or {})))
    return specs
