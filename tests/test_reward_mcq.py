"""extract_choice and the mcq_exact reward on realistic model outputs."""

from __future__ import annotations

import dataclasses

import pytest

from lingshu_rl.rewards.mcq import YES_NO_MAYBE, Choice, extract_choice, gold_key, mcq_exact

OPTS = {"A": "Aspirin", "B": "Metformin", "C": "Insulin glargine", "D": "Glipizide"}
YNM = {"A": "yes", "B": "no", "C": "maybe"}

REASONING_FINAL = (
    "This 68-year-old woman has type 2 diabetes with an HbA1c of 9.8% and an eGFR of 25 mL/min/1.73m2.\n"
    "Option A, aspirin, does nothing for glycaemic control. Option B, metformin, is normally first-line, "
    "but it is contraindicated at an eGFR below 30 because of the risk of lactic acidosis. "
    "Option D, glipizide, is possible but carries a high hypoglycaemia risk at her age.\n\n"
    "Final Answer: C"
)
QWEN_THINK = (
    "<think>\nOkay, let's see. The patient is elderly with CKD stage 4. Metformin would be the usual choice, "
    "so maybe the answer is B? No wait, eGFR 25 is a contraindication. Glipizide can cause hypoglycaemia. "
    "So the answer is C.\n</think>\n\n<answer>C</answer>"
)
ENUMERATION = (
    "Let's evaluate each option.\n"
    "A. Aspirin - not a glucose-lowering drug.\n"
    "B. Metformin - contraindicated with eGFR < 30.\n"
    "D. Glipizide - hypoglycaemia risk.\n\n"
    "C. Insulin glargine"
)


@pytest.mark.parametrize(
    "response, letter, method",
    [
        # bare letters
        ("C", "C", "bare"),
        ("c", "C", "bare"),
        ("(C)", "C", "bare"),
        ("C.", "C", "bare"),
        ("  [C]  \n", "C", "bare"),
        ("Option C", "C", "bare"),
        ("**C**", "C", "bare"),
        ("Ｃ", "C", "bare"),  # full-width
        # answer phrases
        ("The answer is (C).", "C", "marker"),
        ("answer: C", "C", "marker"),
        ("ANSWER: c.", "C", "marker"),
        ("**Answer:** (C) Insulin glargine", "C", "marker"),
        ("the answer is c.", "C", "marker"),
        ("Therefore, the answer is most likely C, given her renal function.", "C", "marker"),
        ("The answer to this question is B because metformin is first-line.", "B", "marker"),
        ("I would choose B.", "B", "marker"),
        ("Given the eGFR, C is the correct answer.", "C", "marker"),
        ("(B) is correct: metformin lowers hepatic glucose output.", "B", "marker"),
        ("The correct option is D", "D", "marker"),
        ("Answer - B", "B", "marker"),
        ("The correct response is C.", "C", "marker"),
        ("After weighing renal function, C is the answer.", "C", "marker"),
        ("Based on the above analysis, I believe the most appropriate choice is C.", "C", "marker"),
        ("The answer is C.\n\nWhy not the others: A is wrong; B would be the correct answer if her eGFR "
         "were above 30.", "C", "marker"),
        ("**Answer: C**\n\n**Explanation:** Metformin (B) is contraindicated at this eGFR.", "C", "marker"),
        ("<think>\nHmm.\n</think>\n\n**Final Answer**\n\\[\n\\boxed{C}\n\\]", "C", "boxed"),
        ("正确答案：C. 甘精胰岛素", "C", "marker"),
        (REASONING_FINAL, "C", "marker"),
        ("At first glance the answer is B, since metformin is first-line. However, her eGFR is 25, "
         "so metformin is contraindicated.\n\nTherefore, the answer is C.", "C", "marker"),
        ("Final Answer:\n\n**C. Insulin glargine**", "C", "marker"),
        ("It could be either A or C at first sight, but the final answer is C.", "C", "marker"),
        ("### Final answer\nThe answer is: **D**", "D", "marker"),
        ("<think>\nMetformin? The answer is B... no.\n</think>\nThe answer is C.", "C", "marker"),
        # Chinese markers
        ("答案是C", "C", "marker"),
        ("答案：C", "C", "marker"),
        ("答案：Ｃ。", "C", "marker"),
        ("正确答案为 B", "B", "marker"),
        ("选C", "C", "marker"),
        ("患者肾功能不全，二甲双胍禁用，故选 C。", "C", "marker"),
        ("A选项错误，B选项禁忌，C选项正确。", "C", "marker"),
        ("分析：A错误，B禁忌。所以答案是C。", "C", "marker"),
        # option text after an answer phrase
        ("The answer is metformin.", "B", "marker_text"),
        ("Final answer: Insulin glargine, because metformin is contraindicated.", "C", "marker_text"),
        # containers
        ("<answer>C</answer>", "C", "answer_tag"),
        (QWEN_THINK, "C", "answer_tag"),
        ("<answer>metformin</answer>", "B", "answer_tag"),
        ("<answer>\n**B. Metformin**\n</answer>", "B", "answer_tag"),
        ("<answer>The answer is (D).</answer>", "D", "answer_tag"),
        ("<answer>\\boxed{C}</answer>", "C", "answer_tag"),
        ("The final answer is $\\boxed{C}$.", "C", "boxed"),
        ("Thus $\\boxed{\\text{C}}$", "C", "boxed"),
        ("\\boxed{\\textbf{B. Metformin}}", "B", "boxed"),
        # "C. text" first, last line
        ("C. Insulin glargine\n\nBasal insulin is safe in advanced CKD.", "C", "leading"),
        ("C) Insulin glargine", "C", "leading"),
        ("(B) Metformin - first-line therapy", "B", "leading"),
        ("C\n\nExplanation: metformin is contraindicated below an eGFR of 30.", "C", "leading"),
        ("Metformin is contraindicated here, glipizide risks hypoglycaemia.\n\n**C**", "C", "last_line"),
        (ENUMERATION, "C", "last_line"),
        # option text alone
        ("Insulin glargine", "C", "text_exact"),
        ("insulin  glargine.", "C", "text_normalized"),
        ("The insulin glargine", "C", "text_normalized"),
        ("Insuline glargin", "C", "text_fuzzy"),
        ("Aspirin contraindicated; safest is\nInsulin glargine", "C", "text_exact"),
        # an option's text inside a short sentence, without its letter
        ("The best choice here is metformin.", "B", "text_in_sentence"),
        ("I would start insulin glargine in this patient.", "C", "text_in_sentence"),
        ("Glipizide would be my pick", "D", "text_in_sentence"),
        ("<answer>The best choice here is metformin</answer>", "B", "answer_tag"),
    ],
)
def test_extract_choice(response, letter, method):
    assert extract_choice(response, OPTS) == Choice(letter, method)


@pytest.mark.parametrize(
    "response",
    [
        "",
        "   \n",
        None,
        # hedges
        "A or C",
        "A, C",
        "A and C",
        "A/C",
        "either A or B",
        "(A) or (C)",
        "The answer is A or C.",
        "The answer is either B or D, depending on renal function.",
        "Both A and C are reasonable choices here.",
        "A or C is correct.",
        "<answer>A, C</answer>",
        "<answer>B or C</answer>",
        "答案是A或C",
        # refusals / not an option
        "I cannot answer this question without more clinical information.",
        "I don't know.",
        "I'm not sure which option is correct.",
        "None of the above.",
        "The answer is none of the above.",
        "我无法回答这个问题。",
        # letters outside the options
        "E",
        "The answer is E.",
        "答案：E",
        "E is the correct answer.",
        # articles, pronouns and other non-answers
        "A patient with these findings should be referred to nephrology.",
        "A 68-year-old woman with diabetes and CKD.",
        "The answer is a bit unclear from the vignette.",
        "Answer: I think more information is needed.",
        "I would need her potassium level first.",
        "The answer is not A.",
        "Option A is incorrect. Option B is incorrect too.",
        "不选A。",
        "B12 deficiency is unlikely.",
        # containers are final, even when the reasoning named a letter
        "The answer is B.\n<answer></answer>",
        "Answer: B\n<answer>The patient needs a nephrology referral</answer>",
        "<answer>E</answer>",
        "\\boxed{}",
        # truncated reasoning: no answer yet
        "<think>\nThe answer is probably B, but let me check the eGFR",
        # enumeration of the options without a verdict
        "A. Aspirin - no.\nB. Metformin - contraindicated.\nC. Insulin glargine - safe.\nD. Glipizide - risky.",
        # options named in a sentence, but hedged between, compared, rejected, or in a longer reply
        "either metformin or insulin",
        "It is either metformin or insulin glargine.",
        "Metformin or glipizide.",
        "Insulin glargine rather than metformin.",
        "Either metformin or a sulfonylurea.",
        "Not metformin.",
        "Metformin is contraindicated here.",
        "Metformin isn't safe at this eGFR.",
        "Her eGFR is 25. Metformin is usually first-line.",
    ],
)
def test_extract_choice_none(response):
    assert extract_choice(response, OPTS) is None


def test_none_of_the_above_when_it_is_an_option():
    opts = {**OPTS, "E": "None of the above"}
    assert extract_choice("None of the above.", opts) == Choice("E", "text_exact")
    assert extract_choice("The answer is E.", opts) == Choice("E", "marker")


def test_last_marker_wins_over_earlier_ones():
    text = "Answer: B seemed right.\nOn reflection, given the eGFR, the correct answer is C.\nFinal answer: D"
    assert extract_choice(text, OPTS) == Choice("D", "marker")


def test_answer_tag_beats_reasoning_and_boxed():
    text = "<think>the answer is B</think>Maybe \\boxed{A}. <answer>D</answer>"
    assert extract_choice(text, OPTS) == Choice("D", "answer_tag")


def test_without_options_letters_a_to_j():
    assert extract_choice("The answer is H.") == Choice("H", "marker")
    assert extract_choice("Metformin") is None  # no option texts to match
    assert extract_choice("The answer is K.") is None


def test_options_as_list_and_odd_keys():
    assert extract_choice("Glipizide", ["Aspirin", "Metformin", "Insulin", "Glipizide"]) == Choice("D", "text_exact")
    assert extract_choice("answer: b", {"(a)": "x", "(b)": "y"}) == Choice("B", "marker")


def test_fuzzy_needs_threshold_and_margin():
    close = {"A": "Type 1 diabetes mellitus", "B": "Type 2 diabetes mellitus"}
    assert extract_choice("Type 2 diabetes mellitus.", close) == Choice("B", "text_exact")
    assert extract_choice("type 2 diabetis mellitus", close) is None  # 96 vs 92: too close to call
    assert extract_choice("diabetes mellitus", close) is None  # equally close to both: ambiguous
    assert extract_choice("Insuline glargin", OPTS, fuzzy_threshold=99) is None


def test_choice_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Choice("A", "bare").letter = "B"  # type: ignore[misc]


@pytest.mark.parametrize(
    "response, expected, method",
    [
        ("Yes", "A", "text_normalized"),
        ("Yes, the randomized trial showed a significant reduction in mortality.", "A", "yes_no"),
        ("No. The difference was not statistically significant (p = 0.21).", "B", "yes_no"),
        ("Based on the cohort data, the answer is maybe.", "C", "marker_text"),
        ("<think>The study is underpowered...</think>\n<answer>no</answer>", "B", "answer_tag"),
        ("The answer is B.", "B", "marker"),
        ("答案：是", "A", "marker_text"),
    ],
)
def test_yes_no_maybe_with_letter_options(response, expected, method):
    assert extract_choice(response, YNM) == Choice(expected, method)


@pytest.mark.parametrize(
    "response, expected",
    [
        ("Yes.", "yes"),
        ("Correct, statins reduce LDL cholesterol.", "yes"),
        ("<answer>No</answer>", "no"),
        ("Final answer: negative", "no"),
        ("Perhaps", "maybe"),
        ("否", "no"),
        ("A", None),  # no letters for a closed question
        ("Yes or no, depending on the cohort", None),
    ],
)
def test_yes_no_maybe_without_options(response, expected):
    got = extract_choice(response, YES_NO_MAYBE)
    assert (got.letter if got else None) == expected


@pytest.mark.parametrize(
    "answer, options, key",
    [("B", OPTS, "B"), ("(b)", OPTS, "B"), ("B.", OPTS, "B"), ("B. Metformin", OPTS, "B"), ("metformin", OPTS, "B"),
     ("yes", YNM, "A"), ("Maybe", YNM, "C"), ("C", None, "C"), ("no", YES_NO_MAYBE, "no"), ("Metformine", OPTS, None),
     ("E", OPTS, None)],
)
def test_gold_key(answer, options, key):
    assert gold_key(answer, options) == key


@pytest.mark.parametrize(
    "response, answer, options, score, extracted",
    [
        (REASONING_FINAL, "C", OPTS, 1.0, 1.0),
        (REASONING_FINAL, "B", OPTS, 0.0, 1.0),
        (QWEN_THINK, "Insulin glargine", OPTS, 1.0, 1.0),  # gold given as the option's text
        ("<answer>metformin</answer>", "B", OPTS, 1.0, 1.0),
        ("The answer is A or C.", "C", OPTS, 0.0, 0.0),
        ("The answer is E.", "E", OPTS, 0.0, 0.0),
        ("", "C", OPTS, 0.0, 0.0),
        ("Yes, the trial met its primary endpoint.", "yes", None, 1.0, 1.0),
        ("No.", "yes", None, 0.0, 1.0),
        ("<answer>maybe</answer>", "maybe", None, 1.0, 1.0),
        ("The answer is A.", "yes", YNM, 1.0, 1.0),
        ("Yes", "A", YNM, 1.0, 1.0),
        ("Yes", "yes", YNM, 1.0, 1.0),
        ("故选D", "D", None, 1.0, 1.0),
        ("The best choice here is metformin.", "B", OPTS, 1.0, 1.0),
        ("The best choice here is metformin.", "C", OPTS, 0.0, 1.0),
        ("either metformin or insulin", "B", OPTS, 0.0, 0.0),
        ("There is no evidence of benefit.", "yes", YNM, 0.0, 0.0),  # yes/no options are never read in a sentence
    ],
)
def test_mcq_exact(response, answer, options, score, extracted):
    assert mcq_exact(response, answer, options) == {"score": score, "extracted": extracted}


def test_mcq_exact_threshold_and_extra_fields():
    assert mcq_exact("Insuline glargin", "C", OPTS, id="q1", task="mcq")["score"] == 1.0
    assert mcq_exact("Insuline glargin", "C", OPTS, fuzzy_threshold=99.0)["score"] == 0.0


def test_resolve_and_call_through_registry():
    from lingshu_rl.rewards import call_reward, resolve_reward

    fn = resolve_reward("mcq_exact")
    assert fn is mcq_exact
    result = call_reward(fn, REASONING_FINAL, "C", {"options": OPTS, "id": "medqa-1", "task": "mcq", "source": "medqa"})
    assert result.score == 1.0 and result.details == {"extracted": 1.0}


def test_missing_options_are_not_choices():
    four_of_five = {**OPTS, "E": None}  # a 4-option item in a table whose schema has E
    assert extract_choice("The answer is E.", four_of_five) is None
    assert extract_choice("The answer is C.", four_of_five) == Choice("C", "marker")
    assert mcq_exact("E", "E", {**OPTS, "E": ""})["score"] == 0.0


def test_options_from_a_numpy_array():
    np = pytest.importorskip("numpy")
    assert extract_choice("Glipizide", np.array(list(OPTS.values()))) == Choice("D", "text_exact")
