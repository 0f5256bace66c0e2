"""Default prompts per task kind, the demo's own prompt, and image paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from lingshu_rl.eval.benchmarks import load_items
from lingshu_rl.eval.benchmarks.base import BenchmarkError
from lingshu_rl.eval.prompts import INSTRUCTIONS, prompt_text, to_sample

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def test_mcq_prompt_lists_lettered_options_and_asks_for_the_letter():
    item = load_items("medqa", FIXTURES)[1]
    text = prompt_text(item)
    assert text.startswith("Question: Which enzyme is deficient")
    assert "\nA. Tyrosinase\nB. Homogentisate oxidase\nC. Phenylalanine hydroxylase\n" in text
    assert text.endswith(INSTRUCTIONS["en"]["mcq"])


def test_pubmedqa_prompt_has_the_context_first():
    text = prompt_text(load_items("pubmedqa", FIXTURES)[0])
    assert text.startswith("Context:\nResults of trials are conflicting.")
    assert "\nA. yes\nB. no\nC. maybe\n" in text


def test_closed_open_and_chinese_prompts():
    en = {i.id: i for i in load_items("slake", FIXTURES)}
    assert prompt_text(en["102"]) == "Does the picture contain lung?\n" + INSTRUCTIONS["en"]["closed"]
    assert prompt_text(en["101"]).endswith(INSTRUCTIONS["en"]["open"])
    zh = load_items("slake_zh", FIXTURES)[1]
    assert prompt_text(zh).endswith(INSTRUCTIONS["zh"]["closed"])


def test_sample_carries_messages_images_and_labels():
    item = load_items("vqa_rad", FIXTURES)[0]
    sample = to_sample(item, FIXTURES)
    assert sample.messages == [{"role": "user", "content": prompt_text(item)}]
    assert sample.images == [str((FIXTURES / "vqa_rad" / "VQA_RAD Image Folder" / "synpic100.jpg").resolve())]
    assert (sample.answer, sample.task, sample.source) == ("No", "closed", "vqa_rad")
    assert sample.meta["organ"] == "HEAD"


def test_missing_image_names_item_and_path(tmp_path):
    item = load_items("slake", FIXTURES)[0]
    with pytest.raises(BenchmarkError, match=r"slake item 101: image not found: .*xmlab1/source.jpg"):
        to_sample(item, tmp_path)


def test_demo_keeps_its_own_messages():
    item = load_items("demo", None, limit=1)[0]
    sample = to_sample(item, None)
    assert sample.messages == item.messages and sample.messages[0]["role"] == "system"
    assert "<answer>" in sample.messages[0]["content"]
