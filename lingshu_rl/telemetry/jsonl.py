"""Crash-safe append-only JSON-lines files (metrics.jsonl, samples.jsonl) with resume truncation."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


def to_jsonable(value: Any) -> Any:
    """Make a value strict-JSON safe: non-finite floats become ``null``, tuples lists, unknown objects ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    try:  # numpy / torch scalars
        return to_jsonable(value.item())
    except (AttributeError, TypeError, ValueError):
        return str(value)


def numbered_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line of a JSON-lines file; a line that is not valid
    JSON gives its ``json.JSONDecodeError`` as the value, so a reader can report every bad line at once."""
    with Path(path).open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as err:
                yield line_no, err


def list_problems(problems: list[str], most: int = 20) -> str:
    """The first ``most`` problems, one per indented line, and how many more there are."""
    shown = problems[:most] + ([f"... and {len(problems) - most} more"] if len(problems) > most else [])
    return "\n  " + "\n  ".join(shown)


def read_jsonl(path: str | Path) -> list[dict]:
    """All complete, parseable rows of a JSONL file (a torn last line is skipped); ``[]`` if missing."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def repair(path: Path, keep_through_step: int | None = None) -> None:
    """Prepare an existing JSONL file for appending.

    Always drops a torn final line (a write cut off by a crash has no trailing newline). With
    ``keep_through_step`` set, also drops every row whose ``step`` is greater (rows without a ``step`` and
    unparseable lines are dropped too), rewriting the file atomically (temp file + ``os.replace``).
    """
    if not path.exists():
        return
    if keep_through_step is None:
        with open(path, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            pos = end
            while pos > 0:  # scan back for the last newline without reading a large file whole
                start = max(0, pos - 65536)
                f.seek(start)
                chunk = f.read(pos - start)
                if pos == end and chunk.endswith(b"\n"):
                    return
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    pos = start + newline + 1
                    break
                pos = start
            if pos == end:
                return
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            continue
        try:
            row = json.loads(line)
            step = row["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            continue
        if isinstance(step, (int, float)) and step <= keep_through_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class JsonlWriter:
    """Appends one JSON object per line; every row is flushed and fsync'd before :meth:`write` returns, so a
    SIGKILL loses at most the row being written (and :func:`repair` removes its torn remains on the next open)."""

    def __init__(self, path: str | Path, *, keep_through_step: int | None = None, fsync: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair(self.path, keep_through_step)
        self._fsync = fsync
        # held open for the writer's lifetime (appends with one fsync each), closed by close()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, row: Mapping[str, Any]) -> None:
        self.write_many([row])

    def write_many(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append rows with a single flush + fsync."""
        text = "".join(json.dumps(to_jsonable(row), ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
        if not text:
            return
        self._file.write(text)
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
