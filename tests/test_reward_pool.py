"""The scoring pool against real slow, raising, hanging, NaN-returning and crashing reward functions."""

import textwrap
import time
from pathlib import Path

import pytest

from lingshu_rl.rewards import resolve_reward
from lingshu_rl.rewards.pool import RewardPool, ScoreItem

BAD_REWARDS = """
    import math, os, time

    def flaky(response, answer, **_):
        if response == "raise":
            raise ZeroDivisionError("division by zero in my reward")
        if response == "hang":
            time.sleep(60)
        if response == "nan":
            return math.nan
        if response == "inf":
            return {"score": math.inf}
        if response == "text":
            return "high"
        if response == "die":
            os._exit(3)
        return float(response == answer)

    def slow(response, answer, **_):
        time.sleep(0.5)
        return 1.0
"""


@pytest.fixture(scope="module")
def rewards_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rewards") / "bad_rewards.py"
    path.write_text(textwrap.dedent(BAD_REWARDS))
    return path


def test_failures_are_isolated_and_named(rewards_file: Path) -> None:
    responses = ["A", "raise", "A", "hang", "nan", "inf", "text", "die", "B", "A"]
    items = [ScoreItem(r, "A", {"id": f"q{i}"}) for i, r in enumerate(responses)]
    with RewardPool(resolve_reward(f"{rewards_file}:flaky"), num_workers=3, timeout_s=2.0, failure_score=-1.0) as pool:
        batch = pool.score(items)
        assert batch.scores == [1.0, -1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 0.0, 1.0]
        by_id = {f.sample_id: f for f in batch.failures}
        assert set(by_id) == {"q1", "q3", "q4", "q5", "q6", "q7"}
        assert by_id["q1"].kind == "error" and "ZeroDivisionError: division by zero in my reward" in by_id["q1"].message
        assert "bad_rewards.py:" in by_id["q1"].message  # where it raised
        assert by_id["q3"].kind == "timeout" and "2 s" in by_id["q3"].message
        assert by_id["q4"].kind == "invalid" and "nan" in by_id["q4"].message
        assert by_id["q5"].kind == "invalid" and "inf" in by_id["q5"].message
        assert by_id["q6"].kind == "invalid" and "'high'" in by_id["q6"].message
        assert by_id["q7"].kind == "crash" and "exit code 3" in by_id["q7"].message
        assert batch.stats() == {"reward/failures": 6.0, "reward/failures_error": 1.0, "reward/failures_timeout": 1.0,
                                 "reward/failures_invalid": 3.0, "reward/failures_crash": 1.0}
        assert batch.seconds < 10
        # the pool replaced the killed workers and keeps serving
        again = pool.score([ScoreItem("A", "A", {"id": "later"})] * 4)
        assert again.scores == [1.0] * 4 and not again.failures


def test_inline_mode_isolates_exceptions(rewards_file: Path) -> None:
    with RewardPool(resolve_reward(f"{rewards_file}:flaky"), num_workers=0) as pool:
        batch = pool.score([ScoreItem("raise", "A", {"id": "x"}), ScoreItem("A", "A")])
    assert batch.scores == [0.0, 1.0] and batch.failures[0].sample_id == "x"


def test_slow_reward_runs_in_parallel(rewards_file: Path) -> None:
    with RewardPool(resolve_reward(f"{rewards_file}:slow"), num_workers=4, timeout_s=10) as pool:
        pool.score([ScoreItem("x", "x")] * 4)  # start-up
        start = time.perf_counter()
        batch = pool.score([ScoreItem("x", "x")] * 16)
        elapsed = time.perf_counter() - start
    assert batch.scores == [1.0] * 16
    assert elapsed < 0.5 * 16 / 2, f"16 x 0.5 s over 4 workers took {elapsed:.1f} s"


def test_lambda_and_builtin_rewards_travel_to_workers() -> None:
    offset = 0.25
    with RewardPool(lambda response, answer: offset + (response == answer), num_workers=1) as pool:
        assert pool.score([ScoreItem("a", "a")]).scores == [1.25]
    with RewardPool(resolve_reward("mcq_exact"), num_workers=2) as pool:
        batch = pool.score([ScoreItem("The answer is B", "B", {"options": {"A": "x", "B": "y"}})])
    assert batch.scores == [1.0]


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        RewardPool(lambda r, a: 0.0, timeout_s=0)
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(lambda r, a: 0.0, num_workers=-1)
