"""Verifiable medical rewards: built-ins, plugin resolution, weighted combinations, the scoring pool."""

from lingshu_rl.rewards import answer_norm, mcq, strict_format  # noqa: F401  (registers the built-ins)
from lingshu_rl.rewards.base import RewardFn, RewardResult, call_reward, to_result
from lingshu_rl.rewards.registry import register, resolve_reward

__all__ = ["RewardFn", "RewardResult", "call_reward", "register", "resolve_reward", "to_result"]
