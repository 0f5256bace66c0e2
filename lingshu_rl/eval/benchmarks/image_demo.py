"""The package's image demo: the generated held-out split of :func:`lingshu_rl.data.image_demo.make_image_demo`.

No data directory is needed (the images are generated into the model cache). Items keep the demo's own chat
messages (answer with the option *text* in ``<answer>`` tags) and their image.
Id: ``image-demo-heldout-<i>``. Subset labels: ``stain`` (the stain drawn).
Count: 100 items (seed 0).
"""

from __future__ import annotations

from pathlib import Path

from lingshu_rl.data.image_demo import make_image_demo
from lingshu_rl.eval.items import EvalItem

FOLDER = None
FILES = ()
COUNT = 100
HF_ID = None


def read(root: Path | None = None, seed: int = 0) -> list[EvalItem]:
    _, heldout = make_image_demo(seed=seed)
    return [EvalItem(id=s.id, benchmark="image_demo", task="mcq", question=s.messages[-1]["content"],
                     answer=s.answer, options=s.options, subsets={"stain": s.meta["stain"]},
                     messages=s.messages, images=[str(path) for path in s.images])  # file paths
            for s in heldout]
