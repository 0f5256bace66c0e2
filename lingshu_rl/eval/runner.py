"""``evaluate``: generate answers with a model on benchmarks, score them and write the report.

Generation is greedy (temperature 0, one response per prompt), in batches of prompts of similar length,
through the rollout engine factory (:func:`lingshu_rl.rollout.factory.make_rollout_engine`): vLLM when asked for
or, with ``engine="auto"``, when it is installed; else transformers. Every prompt (as the model saw it, after
the chat template), response and score is saved to ``OUT/predictions/<benchmark>.jsonl``. A prompt that does
not fit the model's context together with ``max_new_tokens`` is not run and counts as missing (wrong), listed
in the report: vLLM refuses such prompts and transformers would run past the trained positions, so skipping
them is the one behaviour both engines can share.

Images: a vision-language model (its config has a ``vision_config``) gets each item's images, preprocessed by
its own image processor (:mod:`lingshu_rl.data.vision`). A text-only model runs a benchmark with images
(VQA-RAD, SLAKE, reports) only with ``text_only=True``: it answers from the question alone, and the report says
so. The decoded prompts in the predictions show each image as its run of ``<|image_pad|>`` tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lingshu_rl.data.sample import Sample
from lingshu_rl.eval.benchmarks import get_benchmark, load_items
from lingshu_rl.eval.items import EvalItem
from lingshu_rl.eval.prompts import to_sample
from lingshu_rl.eval.report import format_ids, headline, write_results
from lingshu_rl.eval.results import summarize
from lingshu_rl.eval.scoring import ItemScore, score_items
from lingshu_rl.telemetry.jsonl import JsonlWriter
from lingshu_rl.telemetry.redact import without_text

if TYPE_CHECKING:
    from lingshu_rl.data.vision import VisionInputs
    from lingshu_rl.rollout.protocol import RolloutEngine, SamplingParams

ENGINES = ("auto", "vllm", "transformers")
DEFAULT_MAX_NEW_TOKENS = 512
TEXT_ONLY_NOTE = "text-only: the images were NOT given to the model (--text-only); it answered from the question alone"


class EvalError(RuntimeError):
    """A setting that cannot be evaluated (engine not installed, images for a model that cannot take them)."""


def resolve_engine(engine: str) -> Literal["vllm", "transformers"]:
    """``vllm`` or ``transformers``: ``auto`` picks vLLM when it is installed (as ``rollout.engine: auto``)."""
    from lingshu_rl.rollout.vllm_engine import vllm_available

    has_vllm = vllm_available()
    if engine == "auto":
        return "vllm" if has_vllm else "transformers"
    if engine == "vllm":
        if not has_vllm:
            raise EvalError("--engine vllm: vllm is not installed (pip install 'lingshu_rl[vllm]'); "
                            "use --engine transformers")
        return "vllm"
    if engine == "transformers":
        return "transformers"
    raise EvalError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")


def context_length(config: Any) -> int | None:
    """The model's context window (its text model's, for a vision-language config); ``None`` when not stated."""
    for cfg in (config, getattr(config, "text_config", None)):
        length = getattr(cfg, "max_position_embeddings", None)
        if isinstance(length, int):
            return length
    return None


def check_images(items: dict[str, list[EvalItem]], config: Any, model_path: str, text_only: bool) -> None:
    with_images = [name for name, benchmark_items in items.items() if any(i.images for i in benchmark_items)]
    if not with_images or text_only or hasattr(config, "vision_config"):
        return
    raise EvalError(f"benchmark(s) with images: {', '.join(with_images)}; the model at {model_path} is text-only "
                    "(its config has no vision_config). Pass --text-only to answer from the question alone (the "
                    "report will say the images were ignored)")


def generate(engine: RolloutEngine, prompts: list[list[int]], params: SamplingParams, batch_size: int,
             max_prompt_tokens: int | None = None, images: list[VisionInputs | None] | None = None
             ) -> list[tuple[str | None, str]]:
    """``(response text, finish reason)`` per prompt, in order; batches hold prompts of similar length.

    A prompt that leaves no room for ``params.max_new_tokens`` in the model's context (``max_prompt_tokens``)
    is not run: ``(None, "prompt_too_long")``, so it is scored as missing (wrong) on every engine alike.
    """
    fits = [i for i, p in enumerate(prompts) if max_prompt_tokens is None or len(p) <= max_prompt_tokens]
    order = sorted(fits, key=lambda i: len(prompts[i]))
    out: list[tuple[str | None, str]] = [(None, "prompt_too_long")] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        batch_images = [images[i] for i in batch] if images and any(images[i] for i in batch) else None
        for index, generation in zip(batch, engine.generate([prompts[i] for i in batch], params, batch_images)):
            out[index] = (generation.text, generation.finish_reason)
    return out


def _save(path: Path, samples: list[Sample], prompts: list[str], outputs: list[tuple[str | None, str]],
          items: list[EvalItem], scores: list[ItemScore], redact_text: bool) -> None:
    rows: Iterable[dict[str, Any]] = (
        {"id": item.id, "prompt": prompt, "images": sample.images, "response": text, "finish_reason": finish,
             "answer": item.answer, "correct": score.correct, "extracted": score.extracted, "method": score.method,
             "metrics": score.metrics, "subsets": item.subsets}
            for sample, prompt, (text, finish), item, score in zip(samples, prompts, outputs, items, scores))
    if redact_text:
        rows = (without_text(row) for row in rows)
    writer = JsonlWriter(path, fsync=False)
    try:
        writer.write_many(rows)
    finally:
        writer.close()


def _make_engine(model_path: str, engine: Literal["vllm", "transformers"]) -> RolloutEngine:
    import torch

    from lingshu_rl.config import ModelConfig, RolloutConfig
    from lingshu_rl.rollout.factory import make_rollout_engine

    dtype: Literal["bfloat16", "float32"] = "bfloat16" if torch.cuda.is_available() else "float32"
    return make_rollout_engine(model_path, ModelConfig(path=model_path, dtype=dtype), RolloutConfig(engine=engine),
                               "auto")


def evaluate(model_path: str, benchmarks: list[str], data_dir: Path | None, output_dir: Path, engine: str = "auto",
             limit: int | None = None, batch_size: int = 32, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             text_only: bool = False, redact_text: bool = False) -> dict[str, Any]:
    """Evaluate the model at ``model_path`` on ``benchmarks``; write ``output_dir/{results.json, report.md,
    accuracy.png, predictions/}`` and return the results (the content of ``results.json``). ``redact_text``
    keeps prompts, responses, answers and image paths out of the predictions (ids and scores stay)."""
    from transformers import AutoConfig, AutoTokenizer

    from lingshu_rl.data.vision import encode_prompt_with_images, load_image_processor
    from lingshu_rl.rollout.protocol import SamplingParams

    output_dir, data_dir = Path(output_dir), Path(data_dir) if data_dir is not None else None
    items = {name: load_items(name, data_dir, limit) for name in benchmarks}  # data errors before any model load
    samples = {name: [to_sample(item, data_dir) for item in benchmark_items] for name, benchmark_items in items.items()}
    config = AutoConfig.from_pretrained(model_path)
    check_images(items, config, model_path, text_only)
    context = context_length(config)
    if context is not None and max_new_tokens >= context:
        raise EvalError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's {context}-token "
                        "context; lower it")
    if text_only:  # checked to exist above, but not given to the model
        for sample in (s for benchmark_samples in samples.values() for s in benchmark_samples):
            sample.images = []
    engine_name = resolve_engine(engine)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    image_processor = load_image_processor(model_path)  # None: a text-only model
    rollout = _make_engine(model_path, engine_name)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    results: dict[str, Any] = {"model": model_path, "engine": engine_name, "max_new_tokens": max_new_tokens,
                               "limit": limit, "text_only": text_only, "data_dir": str(data_dir) if data_dir else None,
                               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "benchmarks": {}}
    for name, benchmark_items in items.items():
        started = time.monotonic()
        prompt_ids, images = map(list, zip(*(encode_prompt_with_images(tokenizer, image_processor, sample)
                                             for sample in samples[name])))
        outputs = generate(rollout, prompt_ids, params, batch_size, context and context - max_new_tokens, images)
        scores = score_items(benchmark_items, {item.id: text for item, (text, _) in zip(benchmark_items, outputs)
                                               if text is not None})
        # transformers types decode's result ``str | list[str]`` (it also takes batches); one id list gives one str
        prompt_texts: list[str] = [tokenizer.decode(ids) for ids in prompt_ids]  # type: ignore[misc]
        _save(output_dir / "predictions" / f"{name}.jsonl", samples[name], prompt_texts, outputs, benchmark_items,
              scores, redact_text)
        bench = get_benchmark(name)
        notes = ([TEXT_ONLY_NOTE] if text_only and any(i.images for i in benchmark_items) else [])
        if limit is not None:
            notes.append(f"limited to the first {len(benchmark_items)} items (--limit {limit})")
        notes.append(f"{sum(f == 'length' for _, f in outputs)} response(s) hit the {max_new_tokens}-token limit")
        too_long = [item.id for item, (_, f) in zip(benchmark_items, outputs) if f == "prompt_too_long"]
        if too_long:
            notes.append(f"{len(too_long)} prompt(s) longer than the model's {context}-token context minus "
                         f"{max_new_tokens} new tokens were not run and count as missing: {format_ids(too_long)}")
        results["benchmarks"][name] = summarize(name, bench.title, benchmark_items, scores, [], notes)
        print(f"[eval] {name}: {len(benchmark_items)} items in {time.monotonic() - started:.1f}s, "
              f"{headline(results['benchmarks'][name])}", flush=True)
    write_results(results, output_dir)
    return results
