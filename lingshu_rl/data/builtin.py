"""The built-in data sets, by the names configs use: ``demo`` (the text demo) and ``image_demo`` (synthetic
scans), both generated locally (the built-in models are :mod:`lingshu_rl.models.builtin`'s)."""

from __future__ import annotations

from lingshu_rl.data.sample import Sample

DATA = ("demo", "image_demo")


def builtin_train_split(name: str, seed: int) -> list[Sample]:
    """The training split of built-in data set ``name`` (one of :data:`DATA`)."""
    if name == "demo":
        from lingshu_rl.data.demo import make_demo_dataset

        return make_demo_dataset(seed=seed)[0]
    if name == "image_demo":
        from lingshu_rl.data.image_demo import make_image_demo

        return make_image_demo(seed=seed)[0]
    raise ValueError(f"unknown built-in data set {name!r}; built-in: {', '.join(DATA)}")
