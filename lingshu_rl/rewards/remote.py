"""The scoring pool as a Ray actor: scoring runs on the node Ray places the actor on, never beside the driver.

The reward travels cloudpickled together with the source of the user's reward files (:mod:`registry`), which
the actor loads first under the same module names: no copy of those files is needed on the actor's node.
"""

from __future__ import annotations

from pathlib import Path

import cloudpickle

from lingshu_rl.rewards.base import RewardFn
from lingshu_rl.rewards.pool import RewardPool, ScoredBatch, ScoreItem
from lingshu_rl.rewards.registry import load_user_reward_files, user_reward_files
from lingshu_rl.rewards.sandbox import Limits


def reward_payload(reward: RewardFn) -> tuple[bytes, dict[str, tuple[str, str]]]:
    """What :class:`RewardActor` needs to rebuild ``reward`` in another process (on any node)."""
    return cloudpickle.dumps(reward), user_reward_files()


class RewardActor:
    """Owns a :class:`RewardPool` (its sandboxed processes run on this actor's node); ``score`` as the pool's."""

    def __init__(self, payload: tuple[bytes, dict[str, tuple[str, str]]], workers: int, timeout_s: float,
                 failure_score: float, limits: Limits, log_path: str | None):
        reward_bytes, files = payload
        load_user_reward_files(files)  # before unpickling: the reward refers to their modules by name
        self.pool = RewardPool(cloudpickle.loads(reward_bytes), workers, timeout_s, failure_score, limits,
                               Path(log_path) if log_path else None)

    def score(self, items: list[ScoreItem]) -> ScoredBatch:
        return self.pool.score(items)

    def close(self) -> None:
        self.pool.close()
