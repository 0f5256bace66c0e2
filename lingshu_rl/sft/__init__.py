"""Supervised fine-tuning on the same training engines as GRPO."""
