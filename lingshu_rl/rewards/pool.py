"""A scoring pool: rewards run in parallel worker processes with a per-sample timeout.

One bad sample never stops the batch. A reward that raises, returns NaN/inf/a non-number, hangs past the
timeout, or kills its process gives that sample ``failure_score``; the failure is recorded with the sample's
id and the error. A hung or dead worker is killed and replaced. ``num_workers=0`` scores inline in the
calling process (exceptions and bad values are still isolated; timeouts cannot be enforced there).
Workers are sandboxed (:mod:`lingshu_rl.rewards.sandbox`): own session, allow-listed environment, limits on
memory, CPU seconds, file size and processes; their answers are JSON. ``log_path`` collects what rewards print.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import IO, Any

import cloudpickle

from lingshu_rl.rewards.base import RewardFn, RewardResult, RewardValueError, call_reward
from lingshu_rl.rewards.registry import user_reward_files
from lingshu_rl.rewards.sandbox import Limits, describe_exit, make_pids_cgroup, remove_cgroup, worker_env


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

    @staticmethod
    def concat(parts: Sequence[ScoredBatch]) -> ScoredBatch:
        """One batch from consecutive parts (the failures' positions shifted to the whole)."""
        results: list[RewardResult] = []
        failures: list[Failure] = []
        for part in parts:
            failures += [replace(f, index=f.index + len(results)) for f in part.failures]
            results += part.results
        return ScoredBatch(results, failures, sum(p.seconds for p in parts))

    def stats(self) -> dict[str, float]:
        """Counts for logging: ``reward/failures`` and one ``reward/failures_<kind>`` per kind seen."""
        counts = Counter(f.kind for f in self.failures)
        return {"reward/failures": float(len(self.failures)),
                **{f"reward/failures_{k}": float(v) for k, v in counts.items()}}


def score_one(fn: RewardFn, item: ScoreItem) -> tuple[str, Any]:
    try:
        return "ok", call_reward(fn, item.response, item.answer, item.fields)
    except RewardValueError as err:
        return "invalid", str(err)
    except Exception as err:  # a user's reward may raise anything; it must not stop the batch
        frame = traceback.extract_tb(err.__traceback__)[-1]
        return "error", f"{type(err).__name__}: {err} (at {frame.filename}:{frame.lineno})"


_worker_ids = itertools.count()
MAX_ANSWER_BYTES = 1 << 20


def _exit_code(process: subprocess.Popen) -> int | None:
    try:
        return process.wait(timeout=2)
    except subprocess.TimeoutExpired:
        return None


def _as_result(answer: dict[str, Any]) -> RewardResult:
    """Check the shape of a worker's ``ok`` answer; anything else is the worker's fault, not a score."""
    score, details = answer.get("score"), answer.get("details")
    if not isinstance(score, (int, float)) or not isinstance(details, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) for k, v in details.items()):
        raise ValueError(f"malformed answer from a reward worker: {str(answer)[:200]}")
    return RewardResult(float(score), {k: float(v) for k, v in details.items()})


class _Worker:
    """A reward process started with ``python -m lingshu_rl.rewards.worker``, talking over two pipes.

    A fresh interpreter (not fork or multiprocessing spawn) so that the user's ``__main__`` is never re-run
    in the workers and no threads of the parent (torch, Ray) are forked; in its own session, so that
    :meth:`kill` ends it and everything it started; confined by :mod:`lingshu_rl.rewards.sandbox`.
    """

    def __init__(self, reward_bytes: bytes, limits: Limits, log: IO[bytes] | None):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.cgroup = make_pids_cgroup(f"lingshu-reward-{os.getpid()}-{next(_worker_ids)}", limits.max_processes)
        out = log if log is not None else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lingshu_rl.rewards.worker", str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w), env=worker_env(limits, os.pathsep.join(p for p in sys.path if p)),
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self.sender = Connection(to_child_w, readable=False)
        self.conn = Connection(from_child_r, writable=False)
        self.sender.send((limits, None if self.cgroup is None else str(self.cgroup)))
        self.sender.send(user_reward_files())
        self.sender.send_bytes(reward_bytes)
        self.ready = False
        self.task: int | None = None
        self.deadline = float("inf")

    def send(self, message: Any) -> None:
        self.sender.send(message)

    def receive(self) -> dict[str, Any]:
        """The worker's next answer, as data (JSON, size-bounded): never unpickled."""
        return json.loads(self.conn.recv_bytes(maxlength=MAX_ANSWER_BYTES))

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.sender.send(None)
                self.process.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the worker leads its session:
            os.killpg(self.process.pid, signal.SIGKILL)  # its whole process group goes
        self.process.wait(timeout=5)
        remove_cgroup(self.cgroup)
        self.sender.close()
        self.conn.close()

class RewardPool:
    """Score batches of responses with ``reward`` in ``num_workers`` processes.

    Workers start once and are reused across batches; use as a context manager or call :meth:`close`.
    """

    def __init__(self, reward: RewardFn, num_workers: int = 4, timeout_s: float = 30.0, failure_score: float = 0.0,
                 limits: Limits | None = None, log_path: str | Path | None = None):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.reward, self.num_workers, self.timeout_s = reward, num_workers, timeout_s
        self.failure_score = failure_score
        self.limits = limits or Limits()
        self._log = open(log_path, "ab") if log_path is not None and num_workers else None  # noqa: SIM115
        self._workers: list[_Worker] = []
        if num_workers:
            # reward files travel as source text and are loaded by the worker first: their code is pickled by
            # reference
            self._reward_bytes = cloudpickle.dumps(reward)
            self._workers = [self._start() for _ in range(num_workers)]

    def _start(self) -> _Worker:
        return _Worker(self._reward_bytes, self.limits, self._log)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []
        if self._log is not None:
            self._log.close()
            self._log = None

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
                        answer = worker.receive()
                    except (EOFError, OSError, ValueError) as err:
                        if not worker.ready:
                            self.close()
                            raise RuntimeError("a reward worker died while starting: "
                                               + describe_exit(_exit_code(worker.process), self.limits)) from None
                        reason = (describe_exit(_exit_code(worker.process), self.limits)
                                  if isinstance(err, EOFError) else f"the reward process sent no valid answer: {err}")
                        remaining -= self._replace(worker, outcomes, "crash", reason)
                        continue
                    status = answer.get("status")
                    if status == "ready":
                        worker.ready = True
                        continue
                    if status == "unloadable":
                        self.close()
                        raise RuntimeError(f"the reward {getattr(self.reward, '__name__', self.reward)!r} cannot be "
                                           f"loaded in a worker process: {answer.get('message')}")
                    if worker.task is None:  # an answer nobody asked for: the worker is not to be trusted
                        self._replace(worker, outcomes, "crash", "unexpected answer")
                        continue
                    try:
                        outcomes[worker.task] = ("ok", _as_result(answer)) if status == "ok" else (
                            status if status in ("error", "invalid") else "crash", str(answer.get("message")))
                    except ValueError as err:
                        outcomes[worker.task] = ("crash", str(err))
                    worker.task, worker.deadline = None, float("inf")
                    remaining -= 1
                    if answer.get("leaked"):  # processes the reward left running die with a fresh worker
                        self._replace(worker, outcomes, "crash", "")
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
        self._workers[self._workers.index(worker)] = self._start()
        return settled


def score_batch(reward: RewardFn, items: Sequence[ScoreItem], **pool_kwargs: Any) -> ScoredBatch:
    """Score once with a temporary pool (convenient for scripts; a training loop keeps one pool open)."""
    with RewardPool(reward, **pool_kwargs) as pool:
        return pool.score(items)


def items_from_rows(rows: Sequence[Mapping[str, Any]]) -> list[ScoreItem]:
    """``{"response", "answer", ...}`` rows (the scoring CLI's JSONL) into score items."""
    return [ScoreItem(str(row["response"]), row["answer"],
                      {k: v for k, v in row.items() if k not in ("response", "answer")}) for row in rows]
