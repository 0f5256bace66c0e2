"""``eval run`` end to end with the tiny model (a few items, a few tokens), and engine / image checks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lingshu_rl.eval.cli import main
from lingshu_rl.eval.runner import TEXT_ONLY_NOTE, EvalError, evaluate, resolve_engine

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture
def no_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))


def test_engine_choice_without_vllm(no_vllm):
    assert resolve_engine("auto") == "transformers"
    assert resolve_engine("transformers") == "transformers"
    with pytest.raises(EvalError, match="vllm is not installed"):
        resolve_engine("vllm")


def test_engine_choice_with_vllm(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert resolve_engine("auto") == "vllm" and resolve_engine("vllm") == "vllm"


def test_image_benchmark_needs_text_only_for_a_text_model(tmp_path):
    from lingshu_rl.models.tiny import build_tiny_model

    with pytest.raises(EvalError, match=r"vqa_rad; the model at .* is text-only .* --text-only"):
        evaluate(str(build_tiny_model()), ["vqa_rad"], FIXTURES, tmp_path, engine="transformers")


def test_run_generates_saves_scores_and_reports(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["run", "--benchmark", "demo,medqa,vqa_rad", "--data-dir", str(FIXTURES), "--model", "tiny",
                 "--engine", "transformers", "--limit", "2", "--batch-size", "2", "--max-new-tokens", "3",
                 "--text-only", "--output-dir", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines[-3:]] == ["demo", "medqa", "vqa_rad"]
    assert all(" (95% CI " in line and line.endswith("n=2)") for line in lines[-3:])
    results = json.loads((out / "results.json").read_text())
    assert results["engine"] == "transformers" and results["limit"] == 2 and results["text_only"] is True
    assert list(results["benchmarks"]) == ["demo", "medqa", "vqa_rad"]
    assert TEXT_ONLY_NOTE in results["benchmarks"]["vqa_rad"]["notes"]
    assert TEXT_ONLY_NOTE not in results["benchmarks"]["medqa"]["notes"]
    for name in ("demo", "medqa", "vqa_rad"):
        rows = [json.loads(line) for line in (out / "predictions" / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 2
        assert all({"prompt", "response", "correct", "extracted", "method", "answer"} <= set(row) for row in rows)
        assert all(row["prompt"].startswith("<|im_start|>") and row["images"] == [] for row in rows)
    medqa = json.loads((out / "predictions" / "medqa.jsonl").read_text().splitlines()[0])
    assert "A. Staphylococcus saprophyticus" in medqa["prompt"]
    report = (out / "report.md").read_text()
    assert "| vqa_rad | 2 |" in report and "text-only" in report
    assert (out / "accuracy.png").stat().st_size > 0


def test_redact_text_keeps_prompts_and_responses_out_of_the_predictions(tmp_path):
    out = tmp_path / "eval"
    assert main(["run", "--benchmark", "demo", "--model", "tiny", "--engine", "transformers", "--limit", "3",
                 "--max-new-tokens", "3", "--redact-text", "--output-dir", str(out)]) == 0
    text = (out / "predictions" / "demo.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == 3 and all({"id", "correct", "finish_reason"} <= set(row) for row in rows)
    assert not any({"prompt", "response", "answer", "images", "extracted"} & set(row) for row in rows)
    assert "<|im_start|>" not in text


class EchoEngine:
    """Answers each prompt with its length; records the batches it was given."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def generate(self, prompts, params, images=None):
        from lingshu_rl.rollout.protocol import Generation

        self.batches.append([len(p) for p in prompts])
        return [Generation(p, [], str(len(p)), "stop") for p in prompts]


def test_generate_batches_by_length_keeps_order_and_skips_prompts_that_do_not_fit():
    from lingshu_rl.eval.runner import generate
    from lingshu_rl.rollout.protocol import SamplingParams

    engine = EchoEngine()
    prompts = [[0] * n for n in (5, 1, 9, 3, 2)]
    out = generate(engine, prompts, SamplingParams(temperature=0), batch_size=2, max_prompt_tokens=5)
    assert out == [("5", "stop"), ("1", "stop"), (None, "prompt_too_long"), ("3", "stop"), ("2", "stop")]
    assert engine.batches == [[1, 2], [3, 5]]
