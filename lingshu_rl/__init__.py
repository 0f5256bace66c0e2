"""lingshu_rl: RL-centric post-training of medical (multimodal) language models."""

__version__ = "0.1.0"
