r"""Multiple-choice answer extraction (:func:`extract_choice`, shared with evaluation) and the ``mcq_exact`` reward.

The response is first cleaned: NFKC (full-width ``Ａ``/``（``/``：`` become ASCII), ``<think>`` reasoning
dropped, markdown emphasis (``*``, ``__``, backticks, ``#`` headings) and ``\text{}``-style LaTeX wrappers
removed. Then the first rule below that yields an answer wins; ``Choice.method`` names it:

1. ``answer_tag`` / ``boxed`` -- the last ``<answer>...</answer>``, else the last ``\boxed{...}``. Its content is
   read with rules 2-6 and is final: an empty, hedged, unreadable or out-of-range container gives ``None``
   (no fallback to the reasoning before it).
2. ``marker`` / ``marker_text`` -- an explicit answer phrase: "the answer is", "answer:", "Final Answer:",
   "the correct/best option is", "I would choose", "C is the correct answer", 答案是 / 答案： / 正确答案为 /
   选C / 故选 D / C正确; followed by a letter (``marker``) or by an option's text (``marker_text``). Phrases are
   tried from the LAST one backwards (at most 16), so a final "Final Answer: C" beats options discussed
   earlier; the first readable one wins. A hedge ("A or C") or an explicit letter that is not an option ("E"
   for A-D) there gives ``None``.
3. ``bare`` -- the whole response is a choice: "C", "c", "(C)", "C.", "Option C".
4. ``leading`` -- the first line is a choice or starts "C. text" / "C) text" / "(C) text" / "C: text"; skipped
   when several lines start that way (an enumeration of the options, not an answer).
5. ``last_line`` -- the last line is a bare choice, or "C. text" where text is option C's own text.
6. ``text_exact`` / ``text_normalized`` / ``yes_no`` / ``text_fuzzy`` -- the whole response, or its last line,
   is an option's text: verbatim, after :func:`normalize_text`, as a yes/no/maybe synonym, then by rapidfuzz
   ``ratio >= fuzzy_threshold`` and at least ``FUZZY_MARGIN`` points ahead of the runner-up option.
7. ``text_in_sentence`` -- the whole response is one short sentence (at most ``SHORT_SENTENCE_WORDS`` words)
   that names exactly one option's text, as whole words after :func:`normalize_text`, without its letter:
   "The best choice here is metformin." Not when it names two or more options ("either metformin or
   insulin", "insulin rather than metformin") or negates or hedges ("not metformin", "metformin is
   contraindicated", "either metformin or a sulfonylurea"); yes/no/maybe options are never read this way
   ("There is no mass" is not the option "no").

Anything else -- hedges ("A or C", "A, C", "A and C", "either A or B", "A/C", "both A and C"), refusals,
empty output -- gives ``None``. Lower-case letters count only where they stand alone ("answer: c."), so the
article in "the answer is a bit unclear" and in "A patient presents" and the pronoun in "Answer: I think"
are never read as options. Without ``options`` the letters A-J are accepted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rapidfuzz import fuzz

from lingshu_rl.rewards.normalize import (
    canonical_yes_no,
    last_boxed,
    last_tag_content,
    nfkc,
    normalize_text,
    strip_think,
    unwrap_latex,
)
from lingshu_rl.rewards.registry import register

FUZZY_MARGIN = 5.0  # points (0-100) the best fuzzy option must beat the runner-up by
SHORT_SENTENCE_WORDS = 25  # rule 7: the longest one-sentence response read for an option's text inside it
_MAX_MARKERS = 16  # answer phrases tried, from the last; bounds the work on degenerate (looping) outputs
_MAX_SPAN = 300  # characters read after an answer phrase
DEFAULT_LETTERS = frozenset("ABCDEFGHIJ")
YES_NO_MAYBE: dict[str, str] = {"yes": "yes", "no": "no", "maybe": "maybe"}  # options for closed questions


@dataclass(frozen=True)
class Choice:
    """An extracted answer: the option key (upper-cased when a letter) and the rule that found it."""

    letter: str
    method: str


class _NoAnswer(Exception):
    """The response commits to something that is not one option (hedge, out-of-range letter, empty tag)."""


@dataclass(frozen=True)
class _Ctx:
    letters: frozenset[str]
    options: tuple[tuple[str, str], ...]  # (key, text)
    threshold: float


def _key(key: object) -> str:
    key = str(key).strip()
    m = re.fullmatch(r"\(?([A-Za-z])[).]?", key)
    return m.group(1).upper() if m else key


def _context(options: Mapping[str, str] | Sequence[str] | None, threshold: float) -> _Ctx:
    if options is not None and not isinstance(options, Mapping) and hasattr(options, "tolist"):
        options = options.tolist()  # a numpy array from a parquet column
    if options is None or len(options) == 0:
        return _Ctx(DEFAULT_LETTERS, (), threshold)
    if not isinstance(options, Mapping):  # a plain list of option texts: A, B, C, ...
        options = {chr(ord("A") + i): text for i, text in enumerate(options)}
    # A missing option is None or blank (a 4-option item in a table that also holds 5-option items).
    pairs = tuple((_key(k), str(v)) for k, v in options.items() if v is not None and str(v).strip())
    return _Ctx(frozenset(k for k, _ in pairs if len(k) == 1), pairs, threshold)


# A choice token at the start of a span: "C", "(C)", "[c]", "Option C", "选项C"; not glued to a word ("B12").
_CHOICE = re.compile(r"\s*(?:(?i:option|choice|letter)\s*|选项\s*)?([(\[]?)\s*([A-Za-z])\s*([)\]]?)"
                     r"(?![A-Za-z0-9'’]|-[A-Za-z])")
_TERMINAL = re.compile(r"\s*(?:$|[.,;:!?。，；：！)\]\n])")  # what makes a lone letter unmistakable
# Two different letters joined by or/and/,/slash: a hedge, never a single answer.
_JOIN = (r"\s*(?:,|/|&|\+|(?i:or|and)\b|或|和|、|以及)\s*"
         r"(?:(?i:either|both|possibly|maybe|perhaps|option|choice)\s+)?")
_HEDGE = re.compile(r"\s*(?:(?i:either|both|option|choice)\s+)?\(?([A-Z])\)?" + _JOIN + r"\(?([A-Z])\)?"
                    r"(?![A-Za-z0-9]|\s+(?i:is|was|isn't|does|doesn't|has)\b)")  # not "C and A is wrong"
_OR_AFTER = re.compile(r"\s*(?:(?i:either)\s+)?\(?[A-Z]\)?\s*(?:(?i:or)\b|/)")  # "C or ...", "C/": not one answer
_HEDGE_BEFORE = re.compile(r"(?<![A-Za-z0-9])\(?[A-Z]\)?" + _JOIN + r"$")

_EN_MARKER = re.compile(r"""
    \b(?:(?:final|correct|right|best|most\s+likely|true|my)\s+)?answer(?:\s+(?:choice|option))?
        (?:\s+to\s+(?:this|the)\s+question)?\s*
        (?:(?:is|would\s+be|should\s+be|will\s+be|must\s+be)\b\s*[:：]?|[:：=]|\s[-–—](?=\s))
  | \b(?:correct|right|best|most\s+likely|most\s+appropriate|final)\s+(?:option|choice|response)\s*
        (?:(?:is|would\s+be|should\s+be)\b\s*[:：]?|[:：=])
  | \bI(?:\s+would|\s+will|'d|'ll|’d|’ll)?\s+(?:choose|select|pick|go\s+with|opt\s+for)\b
""", re.I | re.X)
# 答案是C / 答案：C / 正确答案为B / 正确选项是C / 选C / 故选D; not 选项A (an option in passing) nor 不(能)选A.
_ZH_MARKER = re.compile(r"(?:最终|正确|最佳)?答案(?:应该|应当|应)?(?:是|为|選|选)?\s*[:：]?"
                        r"|(?:正确|最佳)选项(?:是|为)?\s*[:：]?"
                        r"|(?:故|应|所以|因此|因而|我)?(?<![不能])选择?(?!项)\s*[:：]?")
# The letter before the phrase: "C is the correct answer", "(B) is correct", "C is the answer", "C正确", "B是正确答案".
# Not "B would be correct if ...": a conditional in the discussion of the other options.
_LETTER_FIRST = re.compile(r"(?<![A-Za-z0-9])(?:(?i:option|choice)\s+)?\(?([A-Z])\)?\s+(?i:is)\s+(?i:the\s+)?"
                           r"(?i:(?:most\s+)?(?:correct|right|best)(?:\s+(?:answer|option|choice))?|answer)\b"
                           r"|(?<![A-Za-z0-9])\(?([A-Z])\)?\s*(?:选项|项)?\s*(?:是|为)?\s*(?:正确|最佳)")
_FILLER = re.compile(r"(?:\s*(?i:therefore|thus|hence|so|clearly|likely|most\s+likely|probably|definitely|indeed"
                     r"|then|actually|still)\b[\s,:]*)+")
_CLAUSE_END = re.compile(r"[,;(:—–]|\s-\s|\s(?:because|since|as|which|due)\s", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s|\n")
_LEADING = re.compile(r"^[ \t]*[(\[]?([A-Za-z])(?:[.)\]:：]|\s+[-–—]\s)[ \t]*(.*)$", re.M)
_BARE = re.compile(r"\s*(?:(?i:option|choice|answer)\s*[:：]?\s*)?[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.。]?\s*")
# Words that turn naming an option into rejecting it or hedging (rule 7).
_NOT_A_PICK = re.compile(r"\b(?:not|no|never|neither|nor|without|avoid|avoided|contraindicated|incorrect|wrong"
                         r"|unlikely|unless|except|either|or|maybe|perhaps|possibly)\b|n['’]t\b", re.I)
_MARKDOWN = re.compile(r"\*+|__|`+|^[ \t]*#+[ \t]*|^[ \t]*>[ \t]?", re.M)
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}|\$\s*([A-Za-z])\s*\$")


def _clean(text: str) -> str:
    text = strip_think(nfkc(text))
    text = _LATEX_TEXT.sub(lambda m: m.group(1) or m.group(2), text)
    return _MARKDOWN.sub("", text).strip()


def _letter_at(span: str) -> tuple[str, bool] | None:
    """The choice letter opening ``span`` and whether it is 'strong' (bracketed or followed by punctuation)."""
    m = _CHOICE.match(span)
    if m is None:
        return None
    _, letter, closed = m.groups()
    rest = span[m.end():]
    strong = bool(closed) or _TERMINAL.match(rest) is not None
    if not strong and (letter.islower()  # "the answer is a bit unclear": an article
                       or (letter == "I" and re.match(r"\s+[a-z'’]", rest))  # "Answer: I think ..."
                       or (letter == "A" and re.match(r"\s+\d", rest))):  # "A 45-year-old ..."
        return None
    return letter.upper(), strong


def _match_text(candidate: str, ctx: _Ctx) -> tuple[str, str] | None:
    """Map an option's text (verbatim, normalised, yes/no synonym, fuzzy) to its key."""
    cand = candidate.strip().strip("\"'“”‘’").strip()
    if not cand or not ctx.options:
        return None
    # Much longer than every option: not an option's text (and no per-character work on a long reply).
    short = len(cand) <= 2 * max(len(t) for _, t in ctx.options) + 20
    normed = [(k, normalize_text(t)) for k, t in ctx.options]
    norm = normalize_text(cand) if short else ""
    for method, hits in (
        ("text_exact", [k for k, t in ctx.options if short and t.strip() == cand.rstrip(".。")]),
        ("text_normalized", [k for k, t in normed if norm and t == norm]),
        ("yes_no", [k for k, t in ctx.options if (yn := canonical_yes_no(cand, leading=True))
                    and canonical_yes_no(t) == yn]),  # "Yes, because ..." answers a closed question
    ):
        if len(hits) == 1:
            return hits[0], method
    scores = sorted(((fuzz.ratio(norm, t), k) for k, t in normed if t and norm), reverse=True)
    if scores and scores[0][0] >= ctx.threshold and (len(scores) == 1 or scores[0][0] - scores[1][0] >= FUZZY_MARGIN):
        return scores[0][1], "text_fuzzy"
    return None


def _read_span(span: str, ctx: _Ctx) -> tuple[str, str] | None:
    """Read what follows an answer phrase: a letter (``"letter"``) or an option's text."""
    if filler := _FILLER.match(span):  # "the answer is most likely C"
        span = span[filler.end():]
    if ((h := _HEDGE.match(span)) and h.group(1) != h.group(2)) or _OR_AFTER.match(span):
        raise _NoAnswer
    hit = _letter_at(span)
    if hit and hit[0] in ctx.letters:
        return hit[0], "letter"
    sentence = _SENTENCE_END.split(span.strip(), maxsplit=1)[0]
    for candidate in (sentence, _CLAUSE_END.split(sentence, maxsplit=1)[0]):
        if found := _match_text(candidate, ctx):
            return found
    if hit and hit[1]:
        raise _NoAnswer  # an explicit letter that is not an option: "The answer is E." with A-D
    return None


def _span_after(text: str, pos: int) -> str:
    """The rest of the marker's line, or the next non-empty line when the marker ends its line."""
    rest = text[pos:]
    line, _, after = rest.partition("\n")
    if not line.strip(" \t:：-—"):
        line = next((ln for ln in after[:10 * _MAX_SPAN].split("\n") if ln.strip()), "")
    return line[:_MAX_SPAN]


def _from_markers(text: str, ctx: _Ctx) -> tuple[str, str] | None:
    hits = [(m.start(), m) for rx in (_EN_MARKER, _ZH_MARKER, _LETTER_FIRST) for m in rx.finditer(text)]
    for _, m in sorted(hits, key=lambda h: h[0], reverse=True)[:_MAX_MARKERS]:
        if m.re is _LETTER_FIRST:
            if _HEDGE_BEFORE.search(text[max(0, m.start() - 40):m.start()]):
                raise _NoAnswer  # "A or C is correct"
            letter = m.group(1) or m.group(2)
            if letter not in ctx.letters:
                raise _NoAnswer
            return letter, "marker"
        found = _read_span(_span_after(text, m.end()), ctx)
        if found:
            return found[0], "marker" if found[1] == "letter" else "marker_text"
    return None


def _bare(text: str, ctx: _Ctx) -> tuple[str, str] | None:
    m = _BARE.fullmatch(text)
    if m is None:
        return None
    if m.group(1).upper() not in ctx.letters:
        raise _NoAnswer
    return m.group(1).upper(), "bare"


def _leading(text: str, ctx: _Ctx) -> tuple[str, str] | None:
    first = text.split("\n", 1)[0]
    if (h := _HEDGE.match(first)) and h.group(1) != h.group(2):
        raise _NoAnswer
    if (m := _BARE.fullmatch(first)) and m.group(1).upper() in ctx.letters:
        return m.group(1).upper(), "leading"
    m = _LEADING.match(first)
    if m is None or m.group(1).upper() not in ctx.letters:
        return None
    if len({x.group(1).upper() for x in _LEADING.finditer(text)}) > 1:
        return None  # "A. aspirin: no ... B. metformin: yes ...": the options enumerated, not an answer
    return m.group(1).upper(), "leading"


def _last_line(text: str, ctx: _Ctx) -> tuple[str, str] | None:
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if len(lines) < 2:
        return None
    last = lines[-1]
    if (m := _BARE.fullmatch(last)) and m.group(1).upper() in ctx.letters:
        return m.group(1).upper(), "last_line"
    m = _LEADING.match(last)
    if m and (letter := m.group(1).upper()) in ctx.letters:
        text_of = dict(ctx.options).get(letter)
        if text_of is not None and normalize_text(m.group(2)) == normalize_text(text_of):
            return letter, "last_line"
    return None


def _from_text(text: str, ctx: _Ctx) -> tuple[str, str] | None:
    lines = [ln for ln in text.split("\n") if ln.strip()]
    for candidate in (text, lines[-1]) if len(lines) > 1 else (text,):
        if found := _match_text(candidate, ctx):
            return found
    return None


def _in_sentence(text: str, ctx: _Ctx) -> tuple[str, str] | None:
    """Rule 7: a one-sentence response naming exactly one option's text, neither negated nor hedged."""
    if "\n" in text or len(_SENTENCE_END.split(text)) > 1 or len(text.split()) > SHORT_SENTENCE_WORDS:
        return None
    sentence = f" {normalize_text(text)} "
    named = {k for k, t in ctx.options
             if canonical_yes_no(t) is None and (norm := normalize_text(t)) and f" {norm} " in sentence}
    if len(named) != 1 or _NOT_A_PICK.search(text):
        return None
    return named.pop(), "text_in_sentence"


def _extract(text: str, ctx: _Ctx, containers: bool) -> Choice | None:
    if containers:
        for name, content in (("answer_tag", last_tag_content(text, "answer")), ("boxed", last_boxed(text))):
            if content is not None:
                inner = _extract(_clean(unwrap_latex(content)), ctx, containers=False)
                if inner is None:
                    raise _NoAnswer
                return Choice(inner.letter, name)
    if not text:
        return None
    for rule in (_from_markers, _bare, _leading, _last_line, _from_text, _in_sentence):
        if found := rule(text, ctx):
            return Choice(*found)
    return None


def extract_choice(response: str, options: Mapping[str, str] | Sequence[str] | None = None, *,
                   fuzzy_threshold: float = 85.0) -> Choice | None:
    """The option a model's ``response`` commits to, or ``None`` (see the module docstring for the rules).

    ``options`` maps option keys (``"A"``...) to their texts; a list means A, B, C...; ``None`` accepts the
    letters A-J (no text matching). For closed yes/no/maybe questions pass :data:`YES_NO_MAYBE`: the returned
    ``letter`` is then ``"yes"``, ``"no"`` or ``"maybe"``.
    """
    ctx = _context(options, fuzzy_threshold)
    try:
        return _extract(_clean(response), ctx, containers=True)
    except _NoAnswer:
        return None


def gold_key(answer: object, options: Mapping[str, str] | Sequence[str] | None = None) -> str | None:
    """The option key a gold ``answer`` names: a letter ("B", "(b)", "B. Metformin") or an option's text."""
    ctx = _context(options, 100.0)
    text = nfkc(answer).strip()
    m = re.fullmatch(r"\(?([A-Za-z])\)?[.:]?", text) or _LEADING.fullmatch(text)
    if m and m.group(1).upper() in ctx.letters:
        return m.group(1).upper()
    found = _match_text(text, ctx)
    return found[0] if found and found[1] != "text_fuzzy" else None


@register("mcq_exact")
def mcq_exact(response: str, answer: str, options: Mapping[str, str] | None = None, *,
              fuzzy_threshold: float = 85.0, **_: object) -> dict[str, float]:
    """1.0 when the extracted choice is the gold option. Sub-score ``extracted``: an option was extracted.

    A closed question without options whose gold is yes/no/maybe is matched against :data:`YES_NO_MAYBE`.
    """
    if not options and canonical_yes_no(answer):
        options = YES_NO_MAYBE
    gold = gold_key(answer, options)
    choice = extract_choice(response, options, fuzzy_threshold=fuzzy_threshold)
    return {"score": float(choice is not None and gold is not None and choice.letter == gold),
            "extracted": float(choice is not None)}
