"""Evaluation metrics, implemented here (no nltk / pycocoevalcap downloads), each a pure function.

* :func:`wilson_interval` -- the 95% Wilson score interval of an accuracy (sensible at 0%, 100% and small n,
  unlike the normal approximation).
* :func:`token_prf` -- SQuAD-style token precision/recall/F1 of a short answer: tokens of
  :func:`~lingshu_rl.rewards.normalize.normalize_text` (case, punctuation, articles dropped), counted as bags.
* Report metrics, with pycocoevalcap's conventions (the ones R2Gen-style report papers quote) so numbers are
  comparable: :func:`report_tokens` (lower-cased words, punctuation dropped; pycocoevalcap's PTB tokenizer also
  splits contractions, so rare small differences remain), :func:`corpus_bleu` (BLEU-1..4 over the corpus:
  clipped n-gram counts summed over items, brevity penalty from total lengths), :func:`rouge_l` (LCS
  F-measure with beta = 1.2, averaged over items by the caller), :func:`cider_d` (CIDEr-D: tf-idf n-gram
  vectors, n = 1..4, document frequencies from the references, clipped, Gaussian length penalty sigma = 6,
  times 10; like pycocoevalcap the length is counted in bigrams).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

from lingshu_rl.rewards.normalize import normalize_text

Z_95 = 1.959963984540054  # the two-sided 95% normal quantile
_WORD = re.compile(r"\w+(?:['.-]\w+)*")


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of ``correct / n``; ``(0.0, 1.0)`` when ``n == 0``."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def token_prf(pred: str, gold: str) -> tuple[float, float, float]:
    """``(precision, recall, f1)`` of the normalised tokens of ``pred`` against ``gold``."""
    pred_tokens, gold_tokens = normalize_text(pred).split(), normalize_text(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return precision, recall, 2 * precision * recall / (precision + recall)


def report_tokens(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """``[BLEU-1, ..., BLEU-max_n]`` of tokenised hypotheses against one tokenised reference each."""
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hyps, refs, strict=True):
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, max_n + 1):
            hyp_counts = _ngrams(hyp, n)
            matches[n - 1] += sum((hyp_counts & _ngrams(ref, n)).values())
            totals[n - 1] += sum(hyp_counts.values())
    if hyp_len == 0:
        return [0.0] * max_n
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    scores, log_sum = [], 0.0
    for n in range(max_n):
        if matches[n] == 0:  # every longer n-gram precision is zero too
            scores += [0.0] * (max_n - n)
            break
        log_sum += math.log(matches[n] / totals[n])
        scores.append(brevity * math.exp(log_sum / (n + 1)))
    return scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def rouge_l(hyp: Sequence[str], ref: Sequence[str], beta: float = 1.2) -> float:
    """ROUGE-L F-measure of one tokenised hypothesis against its reference."""
    lcs = _lcs(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def _tfidf(counts: list[Counter], df: Counter, log_n: float) -> tuple[list[dict], list[float]]:
    vecs = [{g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in c.items()} for c in counts]
    return vecs, [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]


def cider_d(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[str]], sigma: float = 6.0) -> list[float]:
    """Per-item CIDEr-D (the corpus score is their mean); needs the whole corpus for document frequencies."""
    ref_counts = [[_ngrams(ref, n) for n in range(1, 5)] for ref in refs]
    df = Counter(g for counts in ref_counts for c in counts for g in c)
    log_n = math.log(len(refs)) if refs else 0.0
    scores = []
    for hyp, r_counts in zip(hyps, ref_counts, strict=True):
        h_counts = [_ngrams(hyp, n) for n in range(1, 5)]
        h_vec, h_norm = _tfidf(h_counts, df, log_n)
        r_vec, r_norm = _tfidf(r_counts, df, log_n)
        delta = sum(h_counts[1].values()) - sum(r_counts[1].values())  # bigram counts, as pycocoevalcap
        total = 0.0
        for n in range(4):
            dot = sum(min(v, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, v in h_vec[n].items())
            if h_norm[n] and r_norm[n]:
                dot /= h_norm[n] * r_norm[n]
            total += dot * math.exp(-delta * delta / (2 * sigma * sigma))
        scores.append(10.0 * total / 4)
    return scores
