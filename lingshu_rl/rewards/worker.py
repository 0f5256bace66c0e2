"""Entry point of a scoring-pool process: ``python -m lingshu_rl.rewards.worker READ_FD WRITE_FD``.

Receives its limits and cgroup, the reward files to load (module name -> path and source) and the cloudpickled reward;
applies the limits (:mod:`lingshu_rl.rewards.sandbox`), answers ``ready``, then scores ``(index, ScoreItem)``
messages until it receives ``None`` or its pipe closes. Every answer is one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

from lingshu_rl.rewards.pool import score_one
from lingshu_rl.rewards.registry import load_user_reward_files
from lingshu_rl.rewards.sandbox import apply_in_worker, arm_cpu_limit, become_subreaper, live_children


def _answer(outbox: Connection, **message: Any) -> None:
    outbox.send_bytes(json.dumps(message).encode())


def main(read_fd: int, write_fd: int) -> None:
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    limits, cgroup = inbox.recv()
    become_subreaper()
    for warning in apply_in_worker(limits, cgroup):
        print(f"[lingshu] reward sandbox: {warning}", file=sys.stderr, flush=True)
    me = os.getpid()
    try:
        load_user_reward_files(inbox.recv())
        reward = cloudpickle.loads(inbox.recv_bytes())
    except Exception as err:
        _answer(outbox, status="unloadable", message=f"{type(err).__name__}: {err}")
        return
    _answer(outbox, status="ready")
    while True:
        try:
            message = inbox.recv()
        except EOFError:
            return
        if message is None:
            return
        index, item = message
        arm_cpu_limit(limits)
        status, payload = score_one(reward, item)
        if os.getpid() != me:  # a process the reward forked came back through here: it must not answer
            os._exit(0)
        result = ({"score": payload.score, "details": payload.details} if status == "ok" else {"message": payload})
        _answer(outbox, status=status, index=index, leaked=len(live_children()), **result)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
