"""answer_norm, answers_match and the shared normalisation helpers."""

from __future__ import annotations

import time

import pytest
import sympy

from lingshu_rl.rewards.answer_norm import answer_norm, answers_match, extract_answer_text
from lingshu_rl.rewards.normalize import (Quantity, canonical_yes_no, last_boxed, normalize_text, parse_quantity,
                                          strip_think, unwrap_latex)

# ------------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Left Ventricle.", "left ventricle"),
        ("  left\tventricle  ", "left ventricle"),
        ("ＬＥＦＴ　ＶＥＮＴＲＩＣＬＥ", "left ventricle"),  # full-width letters and space
        ("A thrombus in the left atrium", "thrombus in left atrium"),
        ("an ACE inhibitor", "ace inhibitor"),
        ("Hepatitis A", "hepatitis a"),  # a capital A mid-text is a name, not an article
        ("vitamin A deficiency", "vitamin a deficiency"),
        ("beta-blocker", "beta blocker"),
        ("0.5 mg", "0.5 mg"),
        ("1,000 IU", "1,000 iu"),
        ("-5", "-5"),
        ("50%", "50 percent"),
        ("HER2+", "her2+"),
        ("“Metformin”", "metformin"),
        ("二甲双胍。", "二甲双胍"),
        ("", ""),
        (None, ""),
    ],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


@pytest.mark.parametrize(
    "text, strict, leading",
    [
        ("Yes", "yes", "yes"), ("YES.", "yes", "yes"), ("y", "yes", "yes"), ("True", "yes", "yes"),
        ("correct", "yes", "yes"), ("Positive", "yes", "yes"), ("present", "yes", "yes"), ("是", "yes", "yes"),
        ("对", "yes", "yes"), ("是的。", "yes", "yes"),
        ("no", "no", "no"), ("N", "no", "no"), ("False", "no", "no"), ("absent", "no", "no"),
        ("negative", "no", "no"), ("Not present", "no", "no"), ("否", "no", "no"), ("不是", "no", "no"),
        ("maybe", "maybe", "maybe"), ("Possibly", "maybe", "maybe"), ("Not sure.", "maybe", "maybe"),
        ("不确定", "maybe", "maybe"),
        ("Yes, the trial met its endpoint.", None, "yes"),
        ("No. The difference was not significant.", None, "no"),
        ("是的，该药物有效。", None, "yes"),
        ("No evidence of benefit was found", None, None),  # no punctuation after the word
        ("N, probably", None, None),  # single letters only as the whole text
        ("Yesterday", None, None),
        ("metformin", None, None),
        ("", None, None),
    ],
)
def test_canonical_yes_no(text, strict, leading):
    assert canonical_yes_no(text) == strict
    assert canonical_yes_no(text, leading=True) == leading


R = sympy.Rational


@pytest.mark.parametrize(
    "text, value, unit",
    [
        ("0.5", R(1, 2), ""), ("1/2", R(1, 2), ""), (".50", R(1, 2), ""), ("5e-1", R(1, 2), ""),
        ("1e-3", R(1, 1000), ""), ("2^3", 8, ""), ("2**3", 8, ""), ("10^-2", R(1, 100), ""), ("(1+2)*3", 9, ""),
        ("-5", -5, ""), ("−5", -5, ""), ("1,000", 1000, ""), ("1,000,000.5", R(2000001, 2), ""),
        ("0.1 + 0.2", R(3, 10), ""), ("５", 5, ""),
        ("5 mg", 5, "mg"), ("5mg", 5, "mg"), ("5.0 mg.", 5, "mg"), ("5 MG", 5, "mg"), ("2.5 mg/kg", R(5, 2), "mg/kg"),
        ("10 mcg", 10, "ug"), ("10 µg", 10, "ug"), ("10 μg", 10, "ug"), ("3 cc", 3, "ml"),
        ("140 mmol/L", 140, "mmol/l"), ("120 mm Hg", 120, "mmhg"), ("37 °C", 37, "degc"), ("37℃", 37, "degc"),
        ("50%", 50, "%"), ("50 %", 50, "%"), ("50 percent", 50, "%"), ("5 x 10^9/L", 5 * 10**9, "/l"),
        ("3/4 mg", R(3, 4), "mg"),
    ],
)
def test_parse_quantity(text, value, unit):
    assert parse_quantity(text) == Quantity(R(value), unit)


@pytest.mark.parametrize(
    "text",
    [
        "", "mg", "five", "metformin 500 mg", "5-10 mg", "5 - 10", "10–20 mg",  # ranges, not subtractions
        "120/80 mmHg", "20/40", "2/4",  # pairs (blood pressure, visual acuity): not divisions
        "5 patients were enrolled in the trial", "1/0", "0^-1", "2^(1/2)", "2^0.5", "9^9^9", "10**10**10",
        "2^999", "1e999", "1" * 80,
        "__import__('os').system('echo pwned')", "exec('1')", "lambda: 1", "x + 1", "1 if 1 else 2", "[1]",
        "1; import os", "(1", "1)", "()",
    ],
)
def test_parse_quantity_refuses(text):
    assert parse_quantity(text) is None


def test_parse_quantity_is_fast_on_hostile_input():
    start = time.perf_counter()
    for text in ["(" * 30 + "1" + ")" * 30, "9" * 60 + "^99", "1+" * 31 + "1", "(((((((((9^99)))))))))" * 3]:
        parse_quantity(text)
    assert time.perf_counter() - start < 1.0


def test_containers():
    assert strip_think("<think>a</think>\nB") .strip() == "B"
    assert strip_think("reasoning only</think>B") == "B"  # opening tag was in the prompt
    assert strip_think("B<think>truncated") == "B"
    assert last_boxed("x \\boxed{1} y \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unbalanced") is None
    assert unwrap_latex("\\boxed{\\text{C}}") == "C"
    assert unwrap_latex("$\\frac{3}{4}\\,\\text{mg}$") == "(3)/(4) mg"
    assert unwrap_latex("5 \\times 10^{9}") == "5 * 10^9"


# ---------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "response, text, delimited",
    [
        ("<think>Metformin? No, eGFR 25.</think>\n<answer>Insulin glargine</answer>", "Insulin glargine", True),
        ("The dose is computed as 0.5 x 10. \\boxed{5 \\text{ mg}}", "5  mg", True),
        ("Weight 10 kg at 0.5 mg/kg.\n\nFinal answer: 5 mg.", "5 mg", True),
        ("The answer is not obvious at first. After adjusting for renal function,\nthe answer is: **2.5 mg**",
         "2.5 mg", True),
        ("Final Answer:\n\nLeft ventricle", "Left ventricle", True),
        ("综合分析，答案是：左心室。", "左心室", True),
        ("Left ventricle.", "Left ventricle", False),
    ],
)
def test_extract_answer_text(response, text, delimited):
    assert extract_answer_text(response) == (text, delimited)


# -------------------------------------------------------------------------------------------- reward


@pytest.mark.parametrize(
    "response, gold",
    [
        ("<answer>The left ventricle</answer>", "left ventricle"),
        ("ＬＥＦＴ ＶＥＮＴＲＩＣＬＥ", "Left ventricle"),
        ("<think>CK-MB rises within 4-6 h...</think>\nThe answer is troponin I.", "Troponin I"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("The probability that the child is a carrier is 1/2.\n\nFinal answer: .50", "1/2"),
        ("Final answer: 5mg", "5 mg"),
        ("<answer>5.0 mg</answer>", "5 mg"),
        ("The maintenance rate is 2^3 mL/h. Answer: 8 mL/h", "8 mL/h"),
        ("<answer>1e-3</answer>", "0.001"),
        ("<answer>1,000 IU</answer>", "1000 IU"),
        ("<answer>50%</answer>", "50 percent"),
        ("<answer>37℃</answer>", "37 °C"),
        ("<answer>120/80 mmHg</answer>", "120/80 mmHg"),
        ("Yes, the randomized trial showed reduced mortality.", "yes"),
        ("<answer>是</answer>", "yes"),
        ("Final answer: Negative", "no"),
        ("<answer>Not sure</answer>", "maybe"),
        ("<answer>答案：左心室</answer>", "答案:左心室"),
    ],
)
def test_answer_norm_matches(response, gold):
    result = answer_norm(response, gold)
    assert result["score"] == 1.0, result


@pytest.mark.parametrize(
    "response, gold",
    [
        ("<answer>right ventricle</answer>", "left ventricle"),
        ("<answer>5 g</answer>", "5 mg"),
        ("<answer>5 mg/kg</answer>", "5 mg"),
        ("<answer>50%</answer>", "0.5"),  # percent is a unit: 50% is not 0.5 ...
        ("<answer>50%</answer>", "50"),  # ... nor a bare 50
        ("<answer>-5</answer>", "5"),
        ("<answer>150/100 mmHg</answer>", "120/80 mmHg"),  # equal ratios, different blood pressures
        ("<answer>5-10 mg</answer>", "-5 mg"),
        ("No evidence of benefit was found in the trial.", "no"),
        ("<answer>yes</answer>", "no"),
        ("<answer>maybe</answer>", "yes"),
        ("", "left ventricle"),
        ("<answer></answer>", "left ventricle"),
        ("<answer>Left ventricle</answer>", ""),
        ("I cannot determine this.", "left ventricle"),
        ("The answer is left ventricle.\n<answer>right atrium</answer>", "left ventricle"),  # the tag is final
    ],
)
def test_answer_norm_mismatches(response, gold):
    assert answer_norm(response, gold)["score"] == 0.0


def test_sub_scores():
    assert answer_norm("<answer>5mg</answer>", "5 mg") == {
        "score": 1.0, "exact": 0.0, "yes_no": 0.0, "numeric": 1.0, "extracted": 1.0}
    assert answer_norm("left ventricle", "Left Ventricle") == {
        "score": 1.0, "exact": 1.0, "yes_no": 0.0, "numeric": 0.0, "extracted": 0.0}
    assert answer_norm("Yes.", "yes")["yes_no"] == 1.0


def test_list_of_gold_answers():
    golds = ["myocardial infarction", "MI", "heart attack"]
    assert answer_norm("<answer>Heart attack</answer>", golds)["score"] == 1.0
    assert answer_norm("<answer>MI</answer>", golds)["exact"] == 1.0
    assert answer_norm("<answer>stroke</answer>", golds)["score"] == 0.0
    assert answer_norm("<answer>0.5 mg</answer>", ("1/2 mg", "500 mcg"))["numeric"] == 1.0


def test_fuzzy():
    response = "<answer>myocardial infarctoin</answer>"
    plain = answer_norm(response, "myocardial infarction")
    assert plain["score"] == 0.0 and "fuzzy_ratio" not in plain
    fuzzy = answer_norm(response, "myocardial infarction", fuzzy=0.9)
    assert fuzzy["score"] == 1.0 and 0.9 <= fuzzy["fuzzy_ratio"] < 1.0
    assert answer_norm(response, "myocardial infarction", fuzzy=90)["score"] == 1.0  # percent scale accepted
    assert answer_norm(response, "myocardial infarction", fuzzy=0.99)["score"] == 0.0
    assert answer_norm("<answer>pulmonary embolism</answer>", "myocardial infarction", fuzzy=0.9)["fuzzy_ratio"] < 0.5
    # numbers are never fuzzy: 6 mg is wrong however close the strings are
    assert answer_norm("<answer>6 mg</answer>", "5 mg", fuzzy=0.5)["score"] == 0.0
    assert answer_norm("", "x", fuzzy=0.5)["fuzzy_ratio"] == 0.0


@pytest.mark.parametrize(
    "pred, gold, fuzzy, expected",
    [
        ("Left ventricle", "left ventricle", None, True),
        ("0.25", "1/4", None, True),
        ("25%", "1/4", None, False),
        ("5 mg", ["5 g", "5000 ug"], None, False),
        ("5 mg", ["5 g", "5 mg"], None, True),
        ("hypokalemia", "hypokalaemia", 0.85, True),
        ("hypokalemia", "hypokalaemia", None, False),
        ("Yes, it does.", "yes", None, True),
    ],
)
def test_answers_match(pred, gold, fuzzy, expected):
    assert answers_match(pred, gold, fuzzy) is expected


def test_extra_fields_accepted_and_resolve_path():
    from lingshu_rl.rewards import call_reward, resolve_reward

    assert answer_norm("<answer>5 mg</answer>", "5mg", options=None, id="q", task="open")["score"] == 1.0
    fn = resolve_reward("answer_norm")
    assert fn is answer_norm
    result = call_reward(fn, "Final answer: 5.0 mg", "5 mg", {"options": None, "id": "q", "task": "open"})
    assert result.score == 1.0 and result.details["numeric"] == 1.0


def test_gold_answers_as_numpy_array_or_none():
    np = pytest.importorskip("numpy")
    assert answer_norm("<answer>MI</answer>", np.array(["myocardial infarction", "MI"]))["score"] == 1.0
    assert answer_norm("<answer>MI</answer>", [None, "MI"])["score"] == 1.0
    assert answer_norm("<answer>MI</answer>", None)["score"] == 0.0
    assert answer_norm("<answer>5</answer>", 5)["numeric"] == 1.0
