"""Entry point of a scoring-pool process: ``python -m lingshu_rl.rewards.worker READ_FD WRITE_FD``.

Receives the reward files to load (module name -> path) and the cloudpickled reward, answers ``ready``, then scores ``(index, ScoreItem)`` messages until it
receives ``None`` or its pipe closes.
"""

from __future__ import annotations

import sys
from multiprocessing.connection import Connection

import cloudpickle

from lingshu_rl.rewards.pool import score_one
from lingshu_rl.rewards.registry import load_user_reward_files


def main(read_fd: int, write_fd: int) -> None:
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    try:
        load_user_reward_files(inbox.recv())
        reward = cloudpickle.loads(inbox.recv_bytes())
    except Exception as err:
        outbox.send(("unloadable", None, f"{type(err).__name__}: {err}"))
        return
    outbox.send(("ready", None, None))
    while True:
        try:
            message = inbox.recv()
        except EOFError:
            return
        if message is None:
            return
        index, item = message
        status, payload = score_one(reward, item)
        outbox.send((status, index, payload))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
