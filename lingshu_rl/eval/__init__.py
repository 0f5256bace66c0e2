"""Medical evaluation on the real benchmarks: readers, prompts, scoring, generation, reports.

Python API (what the launcher's eval stage calls)::

    from lingshu_rl.eval import evaluate, compare
    results = evaluate(model_path, ["medqa", "pubmedqa"], data_dir, output_dir, engine="auto", limit=None)
    compare({"base": base_dir, "sft": sft_dir, "grpo": grpo_dir}, output_dir)  # -> comparison.md
"""

from __future__ import annotations

from typing import Any

__all__ = ["compare", "evaluate"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the runner pulls in torch and transformers, which scoring and export never need.
    if name == "evaluate":
        from lingshu_rl.eval.runner import evaluate

        return evaluate
    if name == "compare":
        from lingshu_rl.eval.report import compare

        return compare
    raise AttributeError(f"module 'lingshu_rl.eval' has no attribute {name!r}")
