"""Reward throughput: ``mcq_exact`` responses/s on one core, and the scoring pool's speed-up on a slow reward.

    python benchmarks/rewards.py [--slow-seconds 1.0 --samples 64 --workers 8]

Prints medians over repeats measured in this one run (the machine is shared: compare ratios, not absolutes).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

from lingshu_rl.rewards import resolve_reward
from lingshu_rl.rewards.base import call_reward
from lingshu_rl.rewards.pool import RewardPool, ScoreItem

OPTIONS = {"A": "Metformin", "B": "Insulin glargine", "C": "Glipizide", "D": "Pioglitazone", "E": "Sitagliptin"}
RESPONSES = [
    "<think>HbA1c is 7.8%, no contraindication; lifestyle plus metformin first.</think>\n<answer>A</answer>",
    "Insulin glargine is reserved for severe hyperglycaemia (option B), glipizide risks hypoglycaemia (C).\n\n"
    "Final Answer: A",
    "The answer is (A) Metformin.",
    "**A. Metformin**",
    "<answer>metformin</answer>",
    "It could be either A or B.",
    "答案是A",
    "Given the renal function, pioglitazone would be avoided; I would choose sitagliptin. $\\boxed{E}$",
    "I cannot provide medical advice.",
    "metformine",
]

SLOW = """
    import time

    def slow(response, answer, **_):
        time.sleep({seconds})
        return float(response == answer)
"""


def mcq_throughput(repeats: int = 5, rounds: int = 200) -> float:
    reward = resolve_reward("mcq_exact")
    call_reward(reward, RESPONSES[0], "A", {"options": OPTIONS})  # warm caches (regexes, rapidfuzz)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(rounds):
            for response in RESPONSES:
                call_reward(reward, response, "A", {"options": OPTIONS})
        rates.append(rounds * len(RESPONSES) / (time.perf_counter() - start))
    return statistics.median(rates)


def pool_speedup(seconds: float, samples: int, workers: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slow_reward.py"
        path.write_text(textwrap.dedent(SLOW.format(seconds=seconds)))
        reward = resolve_reward(f"{path}:slow")
        items = [ScoreItem("x", "x", {"id": str(i)}) for i in range(samples)]
        with RewardPool(reward, num_workers=workers, timeout_s=seconds * 10) as pool:
            pool.score(items[:workers])  # start-up of the worker processes is not part of a step
            parallel = pool.score(items).seconds
    return samples * seconds, parallel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slow-seconds", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    rate = mcq_throughput()
    print(f"mcq_exact: {rate:,.0f} responses/s on one core (median of 5 x {200 * len(RESPONSES)} mixed responses)")
    serial, parallel = pool_speedup(args.slow_seconds, args.samples, args.workers)
    print(f"pool: {args.samples} samples x {args.slow_seconds:g} s reward, {args.workers} workers: {parallel:.1f} s "
          f"(serial would be {serial:.0f} s; speed-up {serial / parallel:.1f}x)")


if __name__ == "__main__":
    main()
