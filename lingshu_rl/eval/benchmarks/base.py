"""What the benchmark readers share: the error type and strict file readers that name file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lingshu_rl.rewards.normalize import normalize_text
from lingshu_rl.telemetry.jsonl import numbered_lines

# Gold answers that make a VQA item a yes/no ("closed") question; 有/没有/包含 stay open (not a yes/no reply).
_YES_NO_GOLD = frozenset({"yes", "no", "是", "是的", "否", "不是"})


class BenchmarkError(ValueError):
    """A benchmark file that is missing or does not have the documented format; the message says where."""


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BenchmarkError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def read_json_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSON-lines file."""
    rows = []
    for line_no, row in numbered_lines(path):
        if isinstance(row, json.JSONDecodeError):
            raise BenchmarkError(f"{path}:{line_no}: not valid JSON ({row.msg})")
        if not isinstance(row, dict):
            raise BenchmarkError(f"{path}:{line_no}: expected a JSON object")
        rows.append((line_no, row))
    return rows


def require(row: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [key for key in keys if key not in row]
    if missing:
        raise BenchmarkError(f"{where}: missing {', '.join(repr(k) for k in missing)}")


def is_yes_no(answer: str) -> bool:
    """Whether a gold answer is a plain yes or no (English or Chinese)."""
    return normalize_text(answer) in _YES_NO_GOLD
