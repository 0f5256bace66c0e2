"""The built-in medical demo: multiple-choice questions over a table of first-line drug facts.

The demo runs anywhere with no data download: :func:`make_demo_dataset` generates questions such as::

    Which drug is first-line for anaphylaxis?
    A. naloxone
    B. epinephrine
    C. imatinib
    D. praziquantel

from :data:`FACTS` (condition -> first-line drug, each a textbook first-line/drug-of-choice pair). The
distractors are other drugs of the table, the options are shuffled, ``answer`` is the gold letter.

The model is asked to answer with the *text* of the right option inside ``<answer></answer>`` (see
:data:`SYSTEM_PROMPT` and :func:`demo_target`): ``mcq_exact`` matches that text back to its letter. A tiny
model learns fact -> drug-name recall in seconds on a CPU but not fact -> option *position* (letters stay at
chance for minutes, see the tiny-demo notes), so the option-text answer lets SFT and GRPO show progress.

Splits. Both splits ask about the same facts (a model cannot infer an unseen fact from its name, so
held-out facts would only measure chance); the held-out split measures whether the fact -> drug recall that
SFT and GRPO teach holds on questions the model was not trained on: every held-out question uses an option
set (the gold drug with its three distractors) that no training question about that fact uses, in a fresh
order, so no held-out prompt equals a training prompt. By default it uses the training phrasings
(:data:`TRAIN_TEMPLATES`); ``paraphrased_heldout=True`` asks it in phrasings never seen in training
(:data:`HELDOUT_TEMPLATES`) instead, a harder generalisation probe: a tiny model that answers 99% of training
questions gets about 60-70% of those, and GRPO on the training phrasings moves that number unpredictably.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace

from lingshu_rl.data.sample import Sample

DEMO_SOURCE = "lingshu_demo"
DEMO_VERSION = 1  # bump when the facts, templates or prompt change (tiny-model caches key on it)

# (condition, first-line drug). Conditions are noun phrases that fit every question template; drugs are
# unique so that every other drug is a wrong option for a question.
FACTS: tuple[tuple[str, str], ...] = (
    ("type 2 diabetes mellitus", "metformin"),
    ("anaphylaxis", "epinephrine"),
    ("childhood absence epilepsy", "ethosuximide"),
    ("trigeminal neuralgia", "carbamazepine"),
    ("primary hypothyroidism", "levothyroxine"),
    ("opioid overdose", "naloxone"),
    ("acetaminophen overdose", "acetylcysteine"),
    ("malignant hyperthermia", "dantrolene"),
    ("herpes simplex encephalitis", "acyclovir"),
    ("Pneumocystis jirovecii pneumonia", "trimethoprim-sulfamethoxazole"),
    ("seizure prophylaxis in severe pre-eclampsia", "magnesium sulfate"),
    ("early Lyme disease", "doxycycline"),
    ("schistosomiasis", "praziquantel"),
    ("rheumatoid arthritis", "methotrexate"),
    ("symptomatic myasthenia gravis", "pyridostigmine"),
    ("methanol poisoning", "fomepizole"),
    ("heparin overdose", "protamine sulfate"),
    ("organophosphate poisoning", "atropine"),
    ("prolactinoma", "cabergoline"),
    ("chronic myeloid leukemia", "imatinib"),
)

# Short on purpose: on a CPU the prompt length dominates the cost of every training step.
SYSTEM_PROMPT = "Answer with the text of the correct option inside <answer></answer>."

TRAIN_TEMPLATES: tuple[str, ...] = (
    "Which drug is first-line for {condition}?",
    "What is the first-line drug for {condition}?",
    "Which medication is the first-line treatment for {condition}?",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "Which of the following is the drug of choice for {condition}?",
    "Name the recommended first-line agent for {condition}.",
)

LETTERS = "ABCD"


def _question(template: str, condition: str, options: dict[str, str]) -> str:
    lines = [template.format(condition=condition)]
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    return "\n".join(lines)


def _make_sample(sample_id: str, fact: int, template: int, templates: tuple[str, ...], drugs: list[str],
                 split: str) -> Sample:
    condition, gold = FACTS[fact]
    options = dict(zip(LETTERS, drugs))
    answer = next(letter for letter, text in options.items() if text == gold)
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": _question(templates[template], condition, options)},
    ]
    return Sample(id=sample_id, messages=messages, answer=answer, options=options, task="mcq",
                  source=DEMO_SOURCE,
                  meta={"fact": fact, "condition": condition, "template": template, "split": split})


def _draw(rng: random.Random, fact: int) -> list[str]:
    """The gold drug of ``fact`` plus three distinct distractors, in random order."""
    gold = FACTS[fact][1]
    others = [drug for _, drug in FACTS if drug != gold]
    drugs = rng.sample(others, len(LETTERS) - 1) + [gold]
    rng.shuffle(drugs)
    return drugs


def _facts_cycle(rng: random.Random, n: int) -> list[int]:
    """``n`` fact indices, every fact (almost) equally often, in random order."""
    facts = [i % len(FACTS) for i in range(n)]
    rng.shuffle(facts)
    return facts


def make_demo_dataset(n_train: int = 2000, n_heldout: int = 200, seed: int = 0, *,
                      paraphrased_heldout: bool = False) -> tuple[list[Sample], list[Sample]]:
    """Generate the demo's ``(train, heldout)`` multiple-choice samples, deterministically from ``seed``.

    Ids are ``demo-train-<i>`` and ``demo-heldout-<i>``. Facts are balanced across each split, the gold letter
    is uniform over A-D. Held-out items use option sets unseen in training and, with ``paraphrased_heldout``,
    unseen phrasings (see the module docstring). The training split does not depend on the held-out options.
    """
    if n_train < 0 or n_heldout < 0:
        raise ValueError("n_train and n_heldout must be >= 0")
    rng = random.Random(f"lingshu-demo-{DEMO_VERSION}-{seed}")
    train: list[Sample] = []
    seen_sets: set[tuple[int, frozenset[str]]] = set()
    for i, fact in enumerate(_facts_cycle(rng, n_train)):
        drugs = _draw(rng, fact)
        seen_sets.add((fact, frozenset(drugs)))
        train.append(_make_sample(f"demo-train-{i}", fact, rng.randrange(len(TRAIN_TEMPLATES)), TRAIN_TEMPLATES,
                                  drugs, "train"))
    templates = HELDOUT_TEMPLATES if paraphrased_heldout else TRAIN_TEMPLATES
    n_sets = math.comb(len(FACTS) - 1, len(LETTERS) - 1)
    sets_per_fact = Counter(fact for fact, _ in seen_sets)
    heldout: list[Sample] = []
    for i, fact in enumerate(_facts_cycle(rng, n_heldout)):
        if sets_per_fact[fact] >= n_sets:
            raise ValueError(f"n_train={n_train} uses every option set of a fact: no unseen held-out question left")
        while True:  # rejection is rare: 969 option sets per fact, ~n_train/20 of them used by training
            drugs = _draw(rng, fact)
            if (fact, frozenset(drugs)) not in seen_sets:
                break
        heldout.append(_make_sample(f"demo-heldout-{i}", fact, rng.randrange(len(templates)), templates, drugs,
                                    "heldout"))
    return train, heldout


def demo_target(sample: Sample) -> str:
    """The SFT target response for a demo sample: the gold option's text in answer tags."""
    assert sample.options is not None, f"demo sample {sample.id!r} has no options"
    return f"<answer>{sample.options[sample.answer]}</answer>"


def demo_sft_sample(sample: Sample) -> Sample:
    """``sample`` with the target appended as the assistant turn (the form SFT data takes)."""
    return replace(sample, messages=[*sample.messages, {"role": "assistant", "content": demo_target(sample)}])


def answer_text(response: str) -> str | None:
    """The text in the last ``<answer>`` tag of ``response`` (an unclosed last tag runs to the end), as
    ``mcq_exact`` reads it; ``None`` without a tag."""
    start = response.rfind("<answer>")
    if start < 0:
        return None
    body = response[start + len("<answer>"):]
    end = body.find("</answer>")
    return body if end < 0 else body[:end]


def demo_score(response: str, sample: Sample) -> float:
    """Reference scorer for the demo: 1.0 when the answer-tag text (:func:`answer_text`) is the gold option's
    text (case-insensitive, surrounding space ignored), else 0.0. ``mcq_exact`` gives the same score on such
    outputs (it also forgives near-miss spellings by fuzzy matching)."""
    assert sample.options is not None, f"demo sample {sample.id!r} has no options"
    text = answer_text(response)
    return float(text is not None and text.strip().lower() == sample.options[sample.answer].strip().lower())


def demo_corpus() -> Iterable[str]:
    """Every text the demo can show a model (prompts in all phrasings, option lines, targets); the tiny
    tokenizer is trained on this, so it does not depend on the split sizes or seed."""
    yield SYSTEM_PROMPT
    for condition, drug in FACTS:
        for template in TRAIN_TEMPLATES + HELDOUT_TEMPLATES:
            yield template.format(condition=condition)
        for letter in LETTERS:
            yield f"{letter}. {drug}"
        yield f"<answer>{drug}</answer>"
