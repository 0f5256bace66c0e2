"""Samples, readers and chat templating."""

from lingshu_rl.data.sample import Sample

__all__ = ["Sample"]
