"""The built-in models, by the names configs use: ``tiny`` (Qwen2) and ``tiny-vl`` (Qwen2.5-VL), built locally."""

from __future__ import annotations

MODELS = ("tiny", "tiny-vl")


def model_path(name: str, seed: int = 0) -> str:
    """``name`` itself, or the directory of a built-in model (built on first use)."""
    if name == "tiny":
        from lingshu_rl.models.tiny import build_tiny_model

        return str(build_tiny_model(seed=seed))
    if name == "tiny-vl":
        from lingshu_rl.models.tiny_vl import build_tiny_vl_model

        return str(build_tiny_vl_model(seed=seed))
    return name
