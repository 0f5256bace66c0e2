"""The package's own demo: the generated held-out split of :func:`lingshu_rl.data.demo.make_demo_dataset`.

No data directory is needed. Items keep the demo's own chat messages as their prompt (it asks for the option
*text* in ``<answer>`` tags; the multiple-choice extraction maps that text back to its letter).
Id: the demo's ``demo-heldout-<i>``.
Subset labels: ``template`` (which held-out phrasing asked the question).
Count: 200 items (seed 0), the split the launcher's demo holds out.
"""

from __future__ import annotations

from pathlib import Path

from lingshu_rl.data.demo import make_demo_dataset
from lingshu_rl.eval.items import EvalItem

FOLDER = None
FILES = ()
COUNT = 200
HF_ID = None


def read(root: Path | None = None, seed: int = 0) -> list[EvalItem]:
    _, heldout = make_demo_dataset(seed=seed)
    return [EvalItem(id=s.id, benchmark="demo", task="mcq", question=s.messages[-1]["content"], answer=s.answer,
                     options=s.options, subsets={"template": str(s.meta["template"])}, messages=s.messages)
            for s in heldout]
