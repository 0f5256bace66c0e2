"""The strict <think>/<answer> format reward."""

from __future__ import annotations

import pytest

from lingshu_rl.rewards.strict_format import strict_format

THINK = ("<think>\nThe patient has an eGFR of 25, so metformin is contraindicated. Glipizide risks "
         "hypoglycaemia in an 80-year-old. Basal insulin is the safest option.\n</think>")


@pytest.mark.parametrize(
    "response",
    [
        f"{THINK}\n<answer>C</answer>",
        f"{THINK}<answer>C</answer>",
        f"\n  {THINK}\n\n<answer>\nC. Insulin glargine\n</answer>\n",
        "<think>\n\n</think>\n\n<answer>C</answer>",  # Qwen3 non-thinking mode: empty think block
        "<think>短暂思考：肾功能不全，二甲双胍禁忌。</think><answer>答案：C</answer>",
        "<think>x</think><answer>**C**</answer>",
    ],
)
def test_well_formed(response):
    assert strict_format(response) == {"score": 1.0, "has_answer": 1.0, "has_think": 1.0}


@pytest.mark.parametrize(
    "response, has_think, has_answer",
    [
        ("", 0.0, 0.0),
        ("The answer is C.", 0.0, 0.0),
        ("<answer>C</answer>", 0.0, 1.0),  # think block required by default
        (THINK, 1.0, 0.0),
        (f"{THINK}\nThe answer is C.", 1.0, 0.0),
        (f"{THINK}<answer></answer>", 1.0, 0.0),
        (f"{THINK}<answer>   \n </answer>", 1.0, 0.0),
        (f"Sure! Let me think.\n{THINK}<answer>C</answer>", 1.0, 1.0),  # text before
        (f"{THINK}<answer>C</answer>\nHope this helps!", 1.0, 1.0),  # text after
        (f"{THINK}\nSo:\n<answer>C</answer>", 1.0, 1.0),  # text between
        (f"<answer>C</answer>{THINK}", 1.0, 1.0),  # wrong order
        (f"{THINK}{THINK}<answer>C</answer>", 0.0, 1.0),  # think twice
        (f"{THINK}<answer>B</answer><answer>C</answer>", 1.0, 0.0),  # answer twice
        ("<think>draft: <answer>B</answer></think><answer>C</answer>", 1.0, 0.0),  # nested answer tag
        (f"{THINK}<answer>C", 1.0, 0.0),  # unclosed
        ("<think>reasoning<answer>C</answer>", 0.0, 1.0),  # think never closed
        ("</think><think>x<answer>C</answer>", 0.0, 1.0),  # closing before opening
        ("<Think>x</Think><answer>C</answer>", 0.0, 1.0),  # tags are case-sensitive
        (f"{THINK}<Answer>C</Answer>", 1.0, 0.0),
    ],
)
def test_malformed(response, has_think, has_answer):
    assert strict_format(response) == {"score": 0.0, "has_answer": has_answer, "has_think": has_think}


def test_none_response():
    assert strict_format(None)["score"] == 0.0


def test_empty_think_can_be_refused():
    assert strict_format("<think>\n\n</think><answer>C</answer>", allow_empty_think=False) == {
        "score": 0.0, "has_answer": 1.0, "has_think": 0.0}
    assert strict_format(f"{THINK}<answer>C</answer>", allow_empty_think=False)["score"] == 1.0


def test_custom_tags():
    text = "<reasoning>eGFR 25: no metformin.</reasoning>\n<final>C</final>"
    assert strict_format(text, think_tag="reasoning", answer_tag="final") == {
        "score": 1.0, "has_answer": 1.0, "has_think": 1.0}
    assert strict_format(text)["score"] == 0.0
    assert strict_format(f"{THINK}<answer>C</answer>", think_tag="reasoning", answer_tag="final")["score"] == 0.0
    # tag names are matched literally, not as regexes
    assert strict_format("<a.b>x</a.b><c+>C</c+>", think_tag="a.b", answer_tag="c+")["score"] == 1.0


@pytest.mark.parametrize(
    "response, score",
    [
        ("<answer>C</answer>", 1.0),
        ("  \n<answer>\nInsulin glargine\n</answer>\n", 1.0),
        ("<answer> </answer>", 0.0),
        ("Answer: <answer>C</answer>", 0.0),
        (f"{THINK}<answer>C</answer>", 0.0),  # nothing but the answer block is allowed
    ],
)
def test_answer_only(response, score):
    result = strict_format(response, think_tag=None)
    assert result["score"] == score
    assert "has_think" not in result


def test_gold_answer_is_ignored_and_extra_fields_accepted():
    text = f"{THINK}<answer>B</answer>"
    assert strict_format(text, "C", options={"A": "x"}, id="1", task="mcq")["score"] == 1.0


def test_resolve_and_call_through_registry():
    from lingshu_rl.rewards import call_reward, resolve_reward

    fn = resolve_reward("format")
    assert fn is strict_format
    result = call_reward(fn, f"{THINK}<answer>C</answer>", "C", {"options": None, "id": "x", "task": "mcq"})
    assert result.score == 1.0 and result.details == {"has_answer": 1.0, "has_think": 1.0}
