"""A scoring pool: rewards run in parallel worker processes with a per-sample timeout.

One bad sample never stops the batch. A reward that raises, returns NaN/inf/a non-number, hangs past the
timeout, or kills its process gives that sample ``failure_score``; the failure is recorded with the sample's
id and the error. A hung or dead worker is killed and replaced. ``num_workers=0`` scores inline in the
calling process (exceptions and bad values are still isolated; timeouts cannot be enforced there).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import cloudpickle

from lingshu_rl.rewards.base import RewardFn, RewardResult, RewardValueError, call_reward
from lingshu_rl.rewards.registry import user_reward_files


@dataclass
class ScoreItem:
    """One response to score, with its sample's gold answer and fields (``id``, ``options``, ...)."""

    response: str
    answer: Any
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Failure:
    index: int  # position in the scored batch
    sample_id: str | None
    kind: str  # "error" | "invalid" | "timeout" | "crash"
    message: str


@dataclass
class ScoredBatch:
    results: list[RewardResult]  # one per item; failures carry the failure score
    failures: list[Failure]
    seconds: float

    @property
    def scores(self) -> list[float]:
        return [r.score for r in self.results]

    def stats(self) -> dict[str, float]:
        """Counts for logging: ``reward/failures`` and one ``reward/failures_<kind>`` per kind seen."""
        counts = Counter(f.kind for f in self.failures)
        return {"reward/failures": float(len(self.failures)), **{f"reward/failures_{k}": float(v) for k, v in counts.items()}}


def score_one(fn: RewardFn, item: ScoreItem) -> tuple[str, Any]:
    try:
        return "ok", call_reward(fn, item.response, item.answer, item.fields)
    except RewardValueError as err:
        return "invalid", str(err)
    except Exception as err:  # a user's reward may raise anything; it must not stop the batch
        frame = traceback.extract_tb(err.__traceback__)[-1]
        return "error", f"{type(err).__name__}: {err} (at {frame.filename}:{frame.lineno})"


class _Worker:
    """A reward process started with ``python -m lingshu_rl.rewards.worker``, talking over two pipes.

    A fresh interpreter (not fork or multiprocessing spawn) so that the user's ``__main__`` is never re-run
    in the workers and no threads of the parent (torch, Ray) are forked.
    """

    def __init__(self, reward_bytes: bytes):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lingshu_rl.rewards.worker", str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self.sender = Connection(to_child_w, readable=False)
        self.conn = Connection(from_child_r, writable=False)
        self.sender.send(user_reward_files())
        self.sender.send_bytes(reward_bytes)
        self.ready = False
        self.task: int | None = None
        self.deadline = float("inf")

    def send(self, message: Any) -> None:
        self.sender.send(message)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.sender.send(None)
                self.process.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)
        self.sender.close()
        self.conn.close()


def _exit_code(process: subprocess.Popen) -> int | None:
    try:
        return process.wait(timeout=2)
    except subprocess.TimeoutExpired:
        return None


class RewardPool:
    """Score batches of responses with ``reward`` in ``num_workers`` processes.

    Workers start once and are reused across batches; use as a context manager or call :meth:`close`.
    """

    def __init__(self, reward: RewardFn, num_workers: int = 4, timeout_s: float = 30.0, failure_score: float = 0.0):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.reward, self.num_workers, self.timeout_s, self.failure_score = reward, num_workers, timeout_s, failure_score
        self._workers: list[_Worker] = []
        if num_workers:
            # reward files travel as paths and are loaded by the worker first: their code is pickled by reference
            self._reward_bytes = cloudpickle.dumps(reward)
            self._workers = [_Worker(self._reward_bytes) for _ in range(num_workers)]

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def score(self, items: Sequence[ScoreItem]) -> ScoredBatch:
        start = time.perf_counter()
        outcomes: list[tuple[str, Any] | None] = [None] * len(items)
        if self.num_workers == 0:
            outcomes = [score_one(self.reward, item) for item in items]
        else:
            self._run_parallel(items, outcomes)
        results, failures = [], []
        for index, (item, outcome) in enumerate(zip(items, outcomes)):
            assert outcome is not None
            status, payload = outcome
            if status == "ok":
                results.append(payload)
            else:
                results.append(RewardResult(self.failure_score, {"failed": 1.0}))
                sample_id = item.fields.get("id")
                failures.append(Failure(index, None if sample_id is None else str(sample_id), status, payload))
        return ScoredBatch(results, failures, time.perf_counter() - start)

    def _run_parallel(self, items: Sequence[ScoreItem], outcomes: list[tuple[str, Any] | None]) -> None:
        pending = deque(range(len(items)))
        remaining = len(items)
        while remaining:
            for worker in self._workers:
                if worker.ready and worker.task is None and pending:
                    worker.task = pending.popleft()
                    worker.deadline = time.monotonic() + self.timeout_s
                    worker.send((worker.task, items[worker.task]))
            busy_deadlines = [w.deadline for w in self._workers if w.task is not None]
            wait_s = max(0.0, min(busy_deadlines) - time.monotonic()) if busy_deadlines else None
            ready_conns = wait([w.conn for w in self._workers], timeout=wait_s)
            for worker in list(self._workers):
                if worker.conn in ready_conns:
                    try:
                        status, index, payload = worker.conn.recv()
                    except (EOFError, OSError):
                        if not worker.ready:
                            self.close()
                            raise RuntimeError(f"a reward worker died while starting (exit code "
                                               f"{worker.process.exitcode})") from None
                        exit_code = _exit_code(worker.process)
                        remaining -= self._replace(worker, outcomes, "crash",
                                                   f"the reward process died (exit code {exit_code})")
                        continue
                    if status == "ready":
                        worker.ready = True
                        continue
                    if status == "unloadable":
                        self.close()
                        raise RuntimeError(f"the reward {getattr(self.reward, '__name__', self.reward)!r} cannot be "
                                           f"loaded in a worker process: {payload}")
                    outcomes[index] = (status, payload)
                    worker.task, worker.deadline = None, float("inf")
                    remaining -= 1
                elif worker.task is not None and time.monotonic() >= worker.deadline:
                    remaining -= self._replace(worker, outcomes, "timeout",
                                               f"the reward did not return within {self.timeout_s:g} s")

    def _replace(self, worker: _Worker, outcomes: list[tuple[str, Any] | None], kind: str, message: str) -> int:
        """Kill ``worker``, record its task (if any) as failed, start a fresh worker; return tasks settled."""
        settled = 0
        if worker.task is not None:
            outcomes[worker.task] = (kind, message)
            settled = 1
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._reward_bytes)
        return settled


def score_batch(reward: RewardFn, items: Sequence[ScoreItem], **pool_kwargs: Any) -> ScoredBatch:
    """Score once with a temporary pool (convenient for scripts; a training loop keeps one pool open)."""
    with RewardPool(reward, **pool_kwargs) as pool:
        return pool.score(items)


def items_from_rows(rows: Sequence[Mapping[str, Any]]) -> list[ScoreItem]:
    """``{"response", "answer", ...}`` rows (the scoring CLI's JSONL) into score items."""
    return [ScoreItem(str(row["response"]), row["answer"], {k: v for k, v in row.items() if k not in ("response", "answer")})
            for row in rows]
