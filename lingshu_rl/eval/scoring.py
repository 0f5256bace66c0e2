"""How a response is scored: one rule per task kind, shared with the rewards (no second implementation).

Rules
-----
* ``mcq`` (MedQA, MedMCQA, MMLU, PubMedQA, demo) -- :func:`lingshu_rl.rewards.mcq.extract_choice` reads the
  option the response commits to (``<answer>``/``\\boxed{}`` content, else an answer phrase such as "The answer
  is C", else a bare letter, a leading "C.", the last line, or an option's own text; see its docstring).
  Correct when that letter is the gold letter. Nothing extracted (refusal, hedge "A or C", empty or cut-off
  output) is wrong.
* ``closed`` (yes/no VQA items) -- :func:`lingshu_rl.rewards.answer_norm.extract_answer_text` takes the answer
  part (answer tag, box, or the rest of the line after "the answer is"/"Answer:", else the whole response) and
  :func:`~lingshu_rl.rewards.answer_norm.answers_match` compares it with the gold: the same yes/no after
  synonym mapping, the whole answer or its opening word followed by punctuation ("No, there is ...").
* ``open`` (short-answer VQA items) -- the same extraction and match: equal after normalisation (case,
  punctuation, articles, whitespace, full-width characters), or the same quantity ("2" == "2.0",
  "5 mg" == "5mg"). Also reported, not used for accuracy: token precision, recall and F1
  (:func:`~lingshu_rl.eval.metrics.token_prf`).
* ``report`` -- no accuracy; BLEU-1..4, ROUGE-L and CIDEr-D over the benchmark (:mod:`lingshu_rl.eval.metrics`),
  on the response without ``<think>`` reasoning.
* A benchmark item without a prediction is scored wrong (method ``missing``); ids the benchmark does not have
  are reported and ignored.

Where this differs from MedEvalKit (``utils/utils.py``)
-------------------------------------------------------
* MCQ: MedEvalKit falls back to the option most similar (difflib) to the whole response when it cannot parse
  a letter or an option text. We do not: that fallback turns refusals, empty and truncated outputs, and
  hedges into a pick, so accuracy then depends on string similarity to garbage and is inflated by about
  1/k of the unparsed items; it also makes the number move when the output format changes, not the
  knowledge. An unreadable answer is wrong here, and the report shows the extraction rate beside accuracy.
  (``extract_choice`` itself accepts an option's text only when it nearly equals one option, with a margin
  over the runner-up.)
* Closed: MedEvalKit counts a response as yes/no when exactly one of the substrings "yes"/"no" occurs and the
  gold is in it, so "abnormal", "not", "know", "eyes" count ("There is no abnormality" is "no"; "I don't
  know" is "no"). We read only an answer that states yes or no.
* Open: MedEvalKit's accuracy is exact string equality after lower-casing ("Left lung." != "left lung",
  "2.0" != "2"), optionally an LLM judge; ours normalises as above, has no judge. Its token F1 uses sets of
  whitespace words with punctuation attached, and its ``calculate_f1`` returns (f1, precision, recall) while
  the caller unpacks (precision, recall, f1), so its reported "precision", "recall" and "f1" are F1,
  precision and recall. Ours: bags of normalised tokens, in the right order.
* Closed vs open split: MedEvalKit splits VQA-RAD by "gold is yes/no"; we keep that as the task (it picks
  the prompt) and also report the file's own ``answer_type`` (CLOSED/OPEN), the split the VQA-RAD and SLAKE
  papers use. SLAKE: MedEvalKit scores English and Chinese together (2094); ours is English (1061) by
  default, ``slake_zh`` separately.
* Reports: MedEvalKit leaves the metrics to a separate script; ours follow pycocoevalcap's definitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lingshu_rl.eval.items import EvalItem
from lingshu_rl.eval.metrics import cider_d, report_tokens, rouge_l, token_prf
from lingshu_rl.rewards.answer_norm import answers_match, extract_answer_text
from lingshu_rl.rewards.mcq import extract_choice
from lingshu_rl.rewards.normalize import strip_think


@dataclass
class ItemScore:
    id: str
    correct: bool | None  # None for reports (no single right answer)
    extracted: str | None  # what the rule read: option letter, answer text, cleaned report; None: nothing
    method: str  # the rule that read it (extract_choice's method, "delimited", "whole_response", ...) or "missing"
    metrics: dict[str, float] = field(default_factory=dict)  # open: precision/recall/f1; report: rouge_l/cider


def score_item(item: EvalItem, response: str | None) -> ItemScore:
    """Score one response to an mcq/closed/open item (``None``: no prediction, wrong)."""
    if response is None:
        return ItemScore(item.id, False, None, "missing",
                         {"precision": 0.0, "recall": 0.0, "f1": 0.0} if item.task == "open" else {})
    if item.task == "mcq":
        choice = extract_choice(response, item.options)
        if choice is None:
            return ItemScore(item.id, False, None, "none")
        return ItemScore(item.id, choice.letter == item.answer, choice.letter, choice.method)
    pred, delimited = extract_answer_text(response)
    score = ItemScore(item.id, answers_match(pred, item.answer), pred or None,
                      "delimited" if delimited else "whole_response")
    if item.task == "open":
        score.metrics = dict(zip(("precision", "recall", "f1"), token_prf(pred, item.answer)))
    return score


def score_reports(items: list[EvalItem], responses: dict[str, str]) -> list[ItemScore]:
    """Per-report ROUGE-L and CIDEr-D (CIDEr needs the whole set for its document frequencies)."""
    texts = [strip_think(responses[item.id]).strip() if item.id in responses else None for item in items]
    hyps = [report_tokens(text or "") for text in texts]
    refs = [report_tokens(item.answer) for item in items]
    ciders = cider_d(hyps, refs)
    return [ItemScore(item.id, None, text, "report" if text is not None else "missing",
                      {"rouge_l": rouge_l(hyp, ref), "cider": cider})
            for item, text, hyp, ref, cider in zip(items, texts, hyps, refs, ciders)]


def score_items(items: list[EvalItem], responses: dict[str, str]) -> list[ItemScore]:
    """Scores aligned with ``items``; an item whose id is not in ``responses`` is missing (wrong)."""
    reports = [item for item in items if item.task == "report"]
    by_id = {s.id: s for s in score_reports(reports, responses)} if reports else {}
    return [by_id[item.id] if item.task == "report" else score_item(item, responses.get(item.id))
            for item in items]
