"""The scoring CLI as a user runs it: a subprocess on JSONL files."""

import json
import subprocess
import sys
from pathlib import Path

import lingshu_rl

EXAMPLE = Path(lingshu_rl.__file__).parent / "examples" / "mcq_responses.jsonl"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lingshu_rl.rewards", "score", *args],
                          capture_output=True, text=True, timeout=120)


def test_scores_bundled_example(tmp_path: Path) -> None:
    out = tmp_path / "scored.jsonl"
    proc = run_cli("--reward", "0.5*format+1.0*mcq_exact", "--input", str(EXAMPLE), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "failures: 0"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    inputs = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    assert len(rows) == len(inputs) and [r["id"] for r in rows] == [r["id"] for r in inputs]
    assert all(isinstance(r["score"], float) and {"format", "mcq_exact"} <= set(r["sub_scores"]) for r in rows)
    mean = sum(r["score"] for r in rows) / len(rows)
    assert lines[-2] == f"mean score: {mean:.4f} over {len(rows)} rows"
    by_id = {r["id"]: r for r in rows}
    assert by_id["ex-1"]["score"] == 1.5 and by_id["ex-6"]["score"] == 0.0 and by_id["ex-12"]["score"] == 0.0


def test_malformed_rows_are_named_by_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"response": "A", "answer": "A"}\n{not json\n{"answer": "B"}\n\n[1, 2]\n')
    proc = run_cli("--reward", "mcq_exact", "--input", str(bad))
    assert proc.returncode == 2
    assert "3 malformed row(s), nothing was scored" in proc.stderr
    assert "line 2: not valid JSON" in proc.stderr
    assert "line 3: missing 'response'" in proc.stderr
    assert "line 5: expected a JSON object" in proc.stderr
    assert not (tmp_path / "bad.scored.jsonl").exists()


def test_failing_reward_is_counted_not_fatal(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text("def picky(response, answer):\n    if response == 'boom':\n        raise RuntimeError('no')\n"
                      "    return 1.0\n")
    data = tmp_path / "in.jsonl"
    data.write_text('{"id": "a", "response": "ok", "answer": "x"}\n{"id": "b", "response": "boom", "answer": "x"}\n')
    proc = run_cli("--reward", f"{plugin}:picky", "--input", str(data), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-2:] == ["mean score: 0.5000 over 2 rows", "failures: 1"]
    assert "row 2 (id b): error: RuntimeError: no" in proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "in.scored.jsonl").read_text().splitlines()]
    assert rows[1]["reward_error"].startswith("error: RuntimeError: no")


def test_unknown_reward_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_cli("--reward", "nope", "--input", str(EXAMPLE), "--output", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 2 and "cannot resolve reward 'nope'" in proc.stderr
