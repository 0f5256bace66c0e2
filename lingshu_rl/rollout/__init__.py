"""Generation engines behind one protocol: transformers `generate` and vLLM."""

from lingshu_rl.rollout.protocol import Generation, RolloutEngine, SamplingParams

__all__ = ["Generation", "RolloutEngine", "SamplingParams"]
