"""GRPO: the algorithm's math, the Ray workers and the controller loop."""
