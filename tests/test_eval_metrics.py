"""Metrics against hand-computed values and against numbers computed once with pycocoevalcap 1.2."""

from __future__ import annotations

import math

import pytest

from lingshu_rl.eval.metrics import cider_d, corpus_bleu, report_tokens, rouge_l, token_prf, wilson_interval


def test_wilson_interval():
    low, high = wilson_interval(803, 1273)
    assert low == pytest.approx(0.603927, abs=1e-6) and high == pytest.approx(0.656873, abs=1e-6)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.277533, abs=1e-6))
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(0, 0) == (0.0, 1.0)


def test_token_prf_uses_normalised_bags():
    assert token_prf("The Left lung.", "left lung") == (1.0, 1.0, 1.0)  # article, case, punctuation dropped
    p, r, f = token_prf("right lower lobe", "right lobe")
    assert (p, r) == (pytest.approx(2 / 3), 1.0) and f == pytest.approx(0.8)
    assert token_prf("lung lung", "lung") == (0.5, 1.0, pytest.approx(2 / 3))  # counted as a bag, not a set
    assert token_prf("", "lung") == (0.0, 0.0, 0.0)


def test_bleu_by_hand():
    hyp, ref = "the cat sat on the mat".split(), "the cat is on the mat".split()
    b1, b2, b3, b4 = corpus_bleu([hyp], [ref])
    assert b1 == pytest.approx(5 / 6) and b2 == pytest.approx(math.sqrt(0.5)) and b3 == pytest.approx(0.5)
    assert b4 == 0.0  # no 4-gram matches
    short = corpus_bleu(["the cat".split()], [ref], max_n=2)
    assert short == [pytest.approx(math.exp(-2)), pytest.approx(math.exp(-2))]  # brevity penalty exp(1 - 6/2)


def test_rouge_l_by_hand():
    assert rouge_l("the cat sat on the mat".split(), "the cat is on the mat".split()) == pytest.approx(5 / 6)
    p, r = 1.0, 1 / 3  # "the cat" against 6 words: LCS 2
    assert rouge_l("the cat".split(), "the cat sat on the mat".split()) == pytest.approx(2.44 * p * r / (r + 1.44 * p))
    assert rouge_l([], ["a"]) == 0.0


def test_cider_d_identical_and_disjoint():
    refs = [["a", "b", "c", "d"], ["e", "f", "g", "h"]]
    assert cider_d([["a", "b", "c", "d"], ["x", "y", "z", "w"]], refs) == [pytest.approx(10.0), 0.0]


def test_report_metrics_match_pycocoevalcap():
    refs = ["the heart size is normal and the lungs are clear",
            "mild cardiomegaly with small bilateral pleural effusions",
            "no acute cardiopulmonary abnormality is seen"]
    hyps = ["the heart is normal and the lungs are clear", "cardiomegaly with a small left pleural effusion",
            "no acute abnormality"]
    h, r = [report_tokens(x) for x in hyps], [report_tokens(x) for x in refs]
    assert corpus_bleu(h, r) == pytest.approx([0.6822380925, 0.5575887939, 0.4592770767, 0.4209334808], abs=1e-9)
    assert sum(rouge_l(a, b) for a, b in zip(h, r)) / 3 == pytest.approx(0.7129186964, abs=1e-9)
    assert cider_d(h, r) == pytest.approx([7.55525861, 1.8452381, 2.38380997], abs=1e-7)


def test_report_tokens():
    assert report_tokens("No acute disease. Heart size: normal, 1.5 cm.") == \
        ["no", "acute", "disease", "heart", "size", "normal", "1.5", "cm"]
