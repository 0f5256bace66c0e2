"""Read samples from JSONL or Parquet files in the documented sample format.

One row per sample. Required: ``answer`` and either ``messages`` (a list of ``{"role", "content"}``) or
``prompt`` (a string, becomes one user message). Optional: ``id`` (default: the row's 0-based position),
``options`` (letter -> text), ``task`` (mcq | closed | open; default mcq when options are given, else open),
``images`` (paths, relative to the data file's folder, or ``{"bytes": ...}`` / ``{"path": ...}`` objects as
Hugging Face datasets store images in Parquet), ``source``, ``system`` (a system prompt put before a
``prompt``), ``target`` (an assistant answer to learn in SFT). Any other column is kept in ``meta`` and
reaches reward functions as a field.
Every malformed row is reported with its file and line; nothing is skipped silently. Image paths are checked
when the file is read: a missing image is an error naming the sample and the path, or, with
``skip_missing_images``, the sample is left out and counted in a printed line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lingshu_rl.data.sample import TASK_KINDS, Sample
from lingshu_rl.telemetry.jsonl import list_problems, numbered_lines

_KNOWN = {"id", "messages", "prompt", "system", "answer", "options", "task", "images", "source", "target"}


class DataError(ValueError):
    """Malformed data; the message names the file and every bad row."""


def _image(entry: Any, folder: Path | None) -> str | bytes:
    """One ``images`` entry as a path (resolved against ``folder``) or bytes."""
    if isinstance(entry, dict):
        entry = entry.get("bytes") or entry.get("path")
    if isinstance(entry, bytes):
        return entry
    if not isinstance(entry, str) or not entry:
        raise ValueError("'images' entries must be paths, or objects with 'bytes' or 'path'")
    path = Path(entry).expanduser()
    return str(path if path.is_absolute() or folder is None else folder / path)


def sample_from_row(row: Any, where: str, position: int, folder: Path | None = None) -> Sample:
    """Validate one row and build its :class:`Sample`; raise ``ValueError`` saying what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    if "answer" not in row or row["answer"] is None:
        raise ValueError("missing 'answer'")
    if "messages" in row:
        messages = row["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and "content" in m
                for m in messages)):
            raise ValueError("'messages' must be a non-empty list of {role: system|user|assistant, content}")
    elif isinstance(row.get("prompt"), str):
        messages = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + \
                   [{"role": "user", "content": row["prompt"]}]
    else:
        raise ValueError("needs 'messages' (a list) or 'prompt' (a string)")
    if row.get("target") is not None:
        messages = [*messages, {"role": "assistant", "content": str(row["target"])}]
    options = row.get("options")
    if options is not None and not (isinstance(options, dict) and all(isinstance(v, str) for v in options.values())):
        raise ValueError("'options' must be an object letter -> option text")
    task = row.get("task") or ("mcq" if options else "open")
    if task not in TASK_KINDS:
        raise ValueError(f"'task' must be one of {', '.join(TASK_KINDS)}, got {task!r}")
    images = row.get("images") or []
    images = [_image(entry, folder) for entry in ([images] if isinstance(images, (str, dict)) else images)]
    sample_id = str(row["id"]) if row.get("id") is not None else str(position)
    meta = {k: v for k, v in row.items() if k not in _KNOWN}
    return Sample(id=sample_id, messages=messages, answer=str(row["answer"]), options=options, task=task,
                  images=images, source=str(row.get("source") or where), meta=meta)


def _rows(path: Path) -> list[tuple[str, Any]]:
    """(location, parsed row or the parse error) for each row of a JSONL or Parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    return [(f"line {line_no}", ValueError(f"not valid JSON ({row.msg} at column {row.colno})")
             if isinstance(row, json.JSONDecodeError) else row) for line_no, row in numbered_lines(path)]


def read_samples(path: str | Path, skip_missing_images: bool = False) -> list[Sample]:
    """All samples of a ``.jsonl`` or ``.parquet`` file; raises :class:`DataError` listing every bad row and
    every missing image (or leaves samples with missing images out, when ``skip_missing_images``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    samples, problems = [], []
    for position, (where, row) in enumerate(_rows(path)):
        try:
            if isinstance(row, Exception):
                raise row
            samples.append(sample_from_row(row, path.stem, position, path.parent))
        except ValueError as err:
            problems.append(f"{where}: {err}")
    if problems:
        raise DataError(f"{path}: {len(problems)} malformed row(s):" + list_problems(problems))
    samples = _check_images(path, samples, skip_missing_images)
    if not samples:
        raise DataError(f"{path}: no samples")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{path}: sample ids must be unique; {duplicate!r} appears more than once")
    return samples


def _check_images(path: Path, samples: list[Sample], skip: bool) -> list[Sample]:
    missing = {s.id: [p for p in s.images if isinstance(p, str) and not Path(p).is_file()] for s in samples}
    missing = {sample_id: paths for sample_id, paths in missing.items() if paths}
    if not missing:
        return samples
    if skip:
        print(f"[data] {path}: skipped {len(missing)} sample(s) with missing images "
              f"(first: {next(iter(missing))!r}: {next(iter(missing.values()))[0]})", flush=True)
        return [s for s in samples if s.id not in missing]
    lines = [f"sample {sample_id!r}: image not found: {', '.join(paths)}" for sample_id, paths in missing.items()]
    raise DataError(f"{path}: {len(missing)} sample(s) with missing images (set skip_missing_images to leave them "
                    "out):" + list_problems(lines))
