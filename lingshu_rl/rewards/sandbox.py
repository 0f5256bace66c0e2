"""What confines a scoring worker: its environment, its resource limits, its process group.

A reward is user code. Each worker process runs in its own session (so a timeout or a crash kills the worker
and everything it started: ``os.killpg``), sees only an allow-listed environment (``WANDB_API_KEY``,
``HF_TOKEN`` and other secrets are absent unless listed), and runs under limits:
  - address space (``RLIMIT_AS``): an allocation past it raises ``MemoryError`` in the reward;
  - CPU seconds per sample (``RLIMIT_CPU``, re-armed before each sample): past it the kernel ends the worker;
  - file size (``RLIMIT_FSIZE``): bounds what it can write, its captured stdout/stderr included (Python
    ignores SIGXFSZ, so a write past it raises ``OSError: File too large`` in the reward);
  - processes: a ``pids`` cgroup when one can be made (root ignores ``RLIMIT_NPROC``), else ``RLIMIT_NPROC``
    counted on top of the user's current processes.
Results come back as JSON, never unpickled from the child.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# passed through to workers; everything else (tokens, keys, cloud credentials) stays out unless allow-listed
BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM", "VIRTUAL_ENV",
            "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PYTHONHASHSEED", "PYTHONUTF8", "PYTHONIOENCODING")
PIDS_CGROUP_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))


@dataclass(frozen=True)
class Limits:
    """Per-worker limits (0 turns one off)."""

    memory_mb: int = 8192  # address space of a worker process
    cpu_s_per_sample: int = 120  # CPU seconds one sample may use (threads add up)
    max_processes: int = 32  # processes a worker and what it starts may have at once
    file_mb: int = 256  # the largest file a worker may write, its log included
    env_allow: tuple[str, ...] = ()  # extra environment variables the reward may see (e.g. an API key it needs)


def worker_env(limits: Limits, python_path: str) -> dict[str, str]:
    allowed = set(BASE_ENV) | set(limits.env_allow)
    env = {k: v for k, v in os.environ.items() if k in allowed or k.startswith("LC_")}
    env.update(PYTHONPATH=python_path, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


def make_pids_cgroup(name: str, max_processes: int) -> Path | None:
    """A ``pids`` cgroup bounding a worker's process count, or None where this process cannot make one."""
    if not max_processes:
        return None
    for root in PIDS_CGROUP_ROOTS:
        if not (root / "cgroup.procs").is_file():
            continue
        if root == Path("/sys/fs/cgroup") and "pids" not in (root / "cgroup.subtree_control").read_text(
                errors="ignore").split():
            continue  # cgroup v2 without the pids controller enabled for children
        group = root / name
        try:
            group.mkdir(exist_ok=True)
            (group / "pids.max").write_text(str(max_processes))
        except OSError:
            continue
        return group
    return None


def remove_cgroup(group: Path | None) -> None:
    """Remove a worker's cgroup once its killed members are gone (they linger for a moment after SIGKILL)."""
    if group is None:
        return
    for _ in range(50):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def _user_process_count() -> int:
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # a process that ended meanwhile
                count += os.stat(entry.path).st_uid == uid
    return count


def apply_in_worker(limits: Limits, cgroup: str | None) -> list[str]:
    """Called first thing in the worker process: join the cgroup and set the limits. Returns warnings."""
    warnings = []
    if cgroup:
        Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
    elif limits.max_processes:
        if os.getuid() == 0:
            warnings.append("the process limit is not enforced: running as root without a writable pids cgroup")
        else:
            allowed = _user_process_count() + limits.max_processes
            resource.setrlimit(resource.RLIMIT_NPROC, (allowed, resource.getrlimit(resource.RLIMIT_NPROC)[1]))
    if limits.memory_mb:
        size = limits.memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
    if limits.file_mb:
        size = limits.file_mb << 20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return warnings


def arm_cpu_limit(limits: Limits) -> None:
    """Before each sample: allow ``cpu_s_per_sample`` more CPU seconds than this process has used so far."""
    if limits.cpu_s_per_sample:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = int(usage.ru_utime + usage.ru_stime) + 1
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        soft = used + limits.cpu_s_per_sample
        resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def describe_exit(code: int | None, limits: Limits) -> str:
    """Why a worker process ended, for the failure message."""
    if code is None:
        return "the reward process died"
    if code < 0:
        import signal

        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        if name == "SIGXCPU":
            return f"the reward used more than {limits.cpu_s_per_sample} CPU seconds (reward.cpu_limit_s)"
        return f"the reward process was killed by {name}"
    return f"the reward process died (exit code {code})"


def become_subreaper() -> None:
    """Orphaned descendants of this process are re-parented to it, so it can see what a reward left running."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def live_children() -> list[int]:
    """Child processes of this process (with :func:`become_subreaper`: every descendant still running)."""
    children: list[int] = []
    for task in Path("/proc/self/task").glob("*/children"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            children += [int(pid) for pid in task.read_text().split()]
    alive = []
    for pid in children:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)  # reap the finished ones
        except ChildProcessError:
            continue
        if done == 0:
            alive.append(pid)
    return alive
