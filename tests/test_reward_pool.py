"""The scoring pool against real slow, raising, hanging, NaN-returning and crashing reward functions."""

import textwrap
import time
from pathlib import Path

import pytest

from lingshu_rl.rewards import resolve_reward
from lingshu_rl.rewards.pool import RewardPool, ScoreItem
from lingshu_rl.rewards.sandbox import Limits

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


# --- the sandbox: real misbehaving rewards ------------------------------------------------------------------------

HOSTILE_REWARDS = """
    import os, subprocess, sys, time

    def grandchild(response, answer, **_):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
        with open(response, "w") as f:
            f.write(str(child.pid))
        if answer == "hang":
            time.sleep(60)
        return 1.0

    def hog_memory(response, answer, **_):
        if response == "hog":
            block = bytearray(10 * 2**30)
            return float(len(block))
        return 1.0

    def fork_bomb(response, answer, **_):
        while True:
            os.fork()

    def secrets(response, answer, **_):
        return {"score": 1.0, "wandb": float("WANDB_API_KEY" in os.environ), "hf": float("HF_TOKEN" in os.environ),
                "listed": float(os.environ.get("MY_REWARD_KEY") == "k")}

    def chatty(response, answer, **_):
        sys.stdout.write("x" * (4 << 20))
        sys.stdout.flush()
        return 1.0

    def burn_cpu(response, answer, **_):
        while True:
            pass
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "hostile_rewards.py"
    path.write_text(textwrap.dedent(HOSTILE_REWARDS))
    return path


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_timeout_kills_the_rewards_grandchildren_too(hostile: Path, tmp_path: Path) -> None:
    pid_files = [tmp_path / "hung.pid", tmp_path / "returned.pid"]
    with RewardPool(resolve_reward(f"{hostile}:grandchild"), num_workers=2, timeout_s=3) as pool:
        batch = pool.score([ScoreItem(str(pid_files[0]), "hang", {"id": "hung"}),
                            ScoreItem(str(pid_files[1]), "ok", {"id": "returned"})])
        assert [f.kind for f in batch.failures] == ["timeout"] and batch.scores[1] == 1.0
        pids = [int(p.read_text()) for p in pid_files]
        deadline = time.time() + 10
        while any(alive(pid) for pid in pids) and time.time() < deadline:
            time.sleep(0.1)
        # the hung sample's worker was killed with its whole group; the one that returned left a process running,
        # so its worker was replaced as well
        assert not any(alive(pid) for pid in pids)
        assert pool.score([ScoreItem(str(tmp_path / "again.pid"), "ok")]).scores == [1.0]


def test_ten_gigabytes_fail_that_sample_and_the_driver_stays_small(hostile: Path) -> None:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with RewardPool(resolve_reward(f"{hostile}:hog_memory"), num_workers=1, timeout_s=30) as pool:
        batch = pool.score([ScoreItem("hog", "A", {"id": "hog"}), ScoreItem("fine", "A", {"id": "fine"})])
    assert batch.scores == [0.0, 1.0]
    assert batch.failures[0].kind == "error" and "MemoryError" in batch.failures[0].message
    assert "hostile_rewards.py:" in batch.failures[0].message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: the driver never held it


def test_a_fork_bomb_is_bounded(hostile: Path) -> None:
    with RewardPool(resolve_reward(f"{hostile}:fork_bomb"), num_workers=1, timeout_s=20,
                    limits=Limits(max_processes=16)) as pool:
        start = time.monotonic()
        batch = pool.score([ScoreItem("x", "A", {"id": "bomb"})])
        assert time.monotonic() - start < 20
        failure = batch.failures[0]
        assert failure.kind == "error" and "Resource temporarily unavailable" in failure.message, failure
    with RewardPool(resolve_reward("mcq_exact"), num_workers=1) as pool:  # the machine is fine afterwards
        assert pool.score([ScoreItem("B", "B")]).scores == [1.0]


def test_secrets_are_absent_unless_listed(hostile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "secret-wandb")
    monkeypatch.setenv("HF_TOKEN", "secret-hf")
    monkeypatch.setenv("MY_REWARD_KEY", "k")
    with RewardPool(resolve_reward(f"{hostile}:secrets"), num_workers=1) as pool:
        assert pool.score([ScoreItem("x", "A")]).results[0].details == {"wandb": 0.0, "hf": 0.0, "listed": 0.0}
    with RewardPool(resolve_reward(f"{hostile}:secrets"), num_workers=1,
                    limits=Limits(env_allow=("MY_REWARD_KEY",))) as pool:
        assert pool.score([ScoreItem("x", "A")]).results[0].details == {"wandb": 0.0, "hf": 0.0, "listed": 1.0}


def test_megabytes_on_stdout_go_to_the_log_not_the_console(hostile: Path, tmp_path: Path,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "rewards.log"
    with RewardPool(resolve_reward(f"{hostile}:chatty"), num_workers=2, log_path=log) as pool:
        assert pool.score([ScoreItem("x", "A")] * 3).scores == [1.0] * 3
    assert log.stat().st_size == 3 * (4 << 20)
    assert len(capfd.readouterr().out) < 1000
    with RewardPool(resolve_reward(f"{hostile}:chatty"), num_workers=1, log_path=log,
                    limits=Limits(file_mb=6)) as pool:  # the log counts against the file-size limit
        batch = pool.score([ScoreItem("x", "A", {"id": "flood"})])
    assert batch.failures and "File too large" in batch.failures[0].message  # EFBIG: Python ignores SIGXFSZ


def test_cpu_seconds_per_sample_are_bounded(hostile: Path) -> None:
    with RewardPool(resolve_reward(f"{hostile}:burn_cpu"), num_workers=1, timeout_s=60,
                    limits=Limits(cpu_s_per_sample=2)) as pool:
        start = time.monotonic()
        batch = pool.score([ScoreItem("x", "A", {"id": "burn"})])
    assert time.monotonic() - start < 20
    assert batch.failures[0].kind == "crash" and "more than 2 CPU seconds" in batch.failures[0].message
