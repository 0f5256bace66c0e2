"""``python -m lingshu_rl.rewards score``: score a JSONL file of responses without any model.

Each input row needs ``response`` and ``answer``; ``options`` (letter -> text), ``id`` and any other column
are passed to the reward as fields. Every row is written back with ``score`` and ``sub_scores`` added (and
``reward_error`` where the reward failed). The last two printed lines are the mean score and the failure count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lingshu_rl.rewards.combine import build_reward, parse_reward_arg
from lingshu_rl.rewards.pool import RewardPool, items_from_rows
from lingshu_rl.telemetry.jsonl import list_problems, numbered_lines


class MalformedInput(ValueError):
    pass


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read and validate every row; raise one error naming every malformed line."""
    rows, problems = [], []
    for line_no, row in numbered_lines(path):
        if isinstance(row, json.JSONDecodeError):
            problems.append(f"line {line_no}: not valid JSON ({row.msg} at column {row.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"line {line_no}: expected a JSON object, got {type(row).__name__}")
            continue
        missing = [key for key in ("response", "answer") if key not in row]
        if missing:
            problems.append(f"line {line_no}: missing {' and '.join(repr(k) for k in missing)}")
            continue
        if row.get("options") is not None and not isinstance(row["options"], dict):
            problems.append(f"line {line_no}: 'options' must be an object letter -> text")
            continue
        rows.append(row)
    if problems:
        raise MalformedInput(f"{path}: {len(problems)} malformed row(s), nothing was scored:" + list_problems(problems))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lingshu_rl.rewards")
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score a JSONL file of responses")
    score.add_argument("--reward", action="append", required=True,
                       help="built-in name, entry point, pkg.module:fn or file.py:fn; '0.5*format+1.0*mcq_exact' "
                            "or repeat the flag (NAME=WEIGHT) to combine")
    score.add_argument("--input", type=Path, required=True)
    score.add_argument("--output", type=Path, help="where to write the scored rows (default: INPUT.scored.jsonl)")
    score.add_argument("--workers", type=int, default=4, help="reward processes (0: score in this process)")
    score.add_argument("--timeout", type=float, default=30.0, help="seconds per sample before it is failed")
    score.add_argument("--failure-score", type=float, default=0.0)
    args = parser.parse_args(argv)

    try:
        specs = [spec for text in args.reward for spec in parse_reward_arg(text)]
        reward = build_reward(specs)
        rows = read_rows(args.input)
    except (MalformedInput, LookupError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    with RewardPool(reward, num_workers=args.workers, timeout_s=args.timeout, failure_score=args.failure_score) as pool:
        batch = pool.score(items_from_rows(rows))
    failures = {f.index: f for f in batch.failures}
    output = args.output or args.input.with_suffix(".scored.jsonl")
    with output.open("w", encoding="utf-8") as handle:
        for index, (row, result) in enumerate(zip(rows, batch.results)):
            scored = {**row, "score": result.score, "sub_scores": result.details}
            if index in failures:
                scored["reward_error"] = f"{failures[index].kind}: {failures[index].message}"
            handle.write(json.dumps(scored, ensure_ascii=False) + "\n")
    for failure in batch.failures:
        print(f"failed: row {failure.index + 1} (id {failure.sample_id}): {failure.kind}: {failure.message}",
              file=sys.stderr)
    mean = sum(batch.scores) / len(batch.scores) if batch.scores else 0.0
    print(f"wrote {len(rows)} rows to {output}")
    print(f"mean score: {mean:.4f} over {len(rows)} rows")
    print(f"failures: {len(batch.failures)}")
    return 0
