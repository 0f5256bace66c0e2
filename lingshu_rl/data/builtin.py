"""The built-in data sets and models, by the names configs use: data ``demo`` (the text demo) and
``image_demo`` (synthetic scans), models ``tiny`` (Qwen2) and ``tiny-vl`` (Qwen2.5-VL), all generated locally."""

from __future__ import annotations

from lingshu_rl.data.sample import Sample

DATA = ("demo", "image_demo")
MODELS = ("tiny", "tiny-vl")


def builtin_train_split(name: str, seed: int) -> list[Sample]:
    """The training split of built-in data set ``name`` (one of :data:`DATA`)."""
    if name == "demo":
        from lingshu_rl.data.demo import make_demo_dataset

        return make_demo_dataset(seed=seed)[0]
    if name == "image_demo":
        from lingshu_rl.data.image_demo import make_image_demo

        return make_image_demo(seed=seed)[0]
    raise ValueError(f"unknown built-in data set {name!r}; built-in: {', '.join(DATA)}")


def model_path(name: str, seed: int = 0) -> str:
    """``name`` itself, or the directory of a built-in model (built on first use)."""
    if name == "tiny":
        from lingshu_rl.models.tiny import build_tiny_model

        return str(build_tiny_model(seed=seed))
    if name == "tiny-vl":
        from lingshu_rl.models.tiny_vl import build_tiny_vl_model

        return str(build_tiny_vl_model(seed=seed))
    return name
