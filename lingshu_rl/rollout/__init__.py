"""Generation engines behind one protocol (transformers now; vLLM later)."""

from lingshu_rl.rollout.protocol import Generation, RolloutEngine, SamplingParams

__all__ = ["Generation", "RolloutEngine", "SamplingParams"]
