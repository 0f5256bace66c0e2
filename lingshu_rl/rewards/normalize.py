"""Shared text normalisation for the text-matching rewards (``mcq_exact``, ``answer_norm``) and evaluation.

Four groups of helpers:

* :func:`normalize_text` -- the canonical form used for string equality: Unicode NFKC (full-width letters,
  digits and punctuation become ASCII), case folding, ``%`` spelled ``percent``, punctuation dropped (a decimal
  point or thousands comma between digits and a leading minus sign are kept), the articles *a/an/the* dropped
  where they precede a word (a capital ``A`` is kept mid-text: "Hepatitis A", "vitamin A"), whitespace collapsed.
* :func:`canonical_yes_no` -- maps yes/no/maybe synonyms (English and Chinese, listed in ``YES_WORDS``,
  ``NO_WORDS``, ``MAYBE_WORDS``) to ``"yes"``/``"no"``/``"maybe"``. With ``leading=True`` a reply that *opens*
  with a synonym followed by punctuation ("Yes, because ...", "No. The trial ...") counts too; "No evidence of
  ..." does not (no punctuation after the word).
* :func:`parse_quantity` -- a number or small arithmetic expression with an optional unit, compared exactly
  with sympy Rationals: ``"0.5" == "1/2" == ".50" == "5e-1"``, ``"2^3" == "8"``, ``"5 mg" == "5mg" == "5.0 mg"``,
  ``"5 mg" != "5 g"``, ``"1,000" == "1000"``. ``%`` is a unit like any other: ``"50%" == "50 percent"`` but
  ``"50%" != "0.5"`` and ``"50%" != "50"``. A binary minus is refused ("5-10 mg" is a range, not -5 mg).
  A bare ``int/int`` not in lowest terms is not a number either: "120/80 mmHg" and "20/40" are a blood pressure
  and a visual acuity, so "150/100" must not equal "120/80" (two lowest-term fractions never collide).
  Units are compared case-insensitively after a few aliases (mcg/μg -> ug, cc -> ml, percent -> %), so the rare
  mM/mm pair is conflated. Safety: sympy's ``sympify`` calls ``eval``; here ``parse_expr`` only ever sees a string
  of digits, ``.``, ``e``/``E`` exponents, ``+ - * / ^`` and parentheses that passed a strict regex (length
  cap 64, at most one power with a literal integer exponent |n| <= 99), so nothing but arithmetic can run.
* answer containers -- :func:`strip_think`, :func:`last_tag_content`, :func:`last_boxed`, :func:`unwrap_latex`.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

# ----------------------------------------------------------------------------------------------- text

_KEEP_SYMBOLS_OUT = set("`^|~")  # markdown/LaTeX noise among the Unicode "symbol" characters
_DIGIT_SEP = re.compile(r"(?<=\d)[.,](?=\d)")  # 0.5, 1,000: punctuation that belongs to a number
_LEADING_MINUS = re.compile(r"(?<![\w.])-(?=\.?\d)")  # -5: a sign, not a hyphen
_ARTICLES = re.compile(r"\b(?:[Tt]he|[Aa]n|THE|AN)\s+(?=\w)|\ba\s+(?=\w)|(?:^|(?<=[.!?:;]\s))A\s+(?=\w)")
_SPACES = re.compile(r"\s+")


def nfkc(text: Any) -> str:
    """NFKC form of ``text`` (``None`` -> ``""``): full-width Ａ/１/（/：/％ become A/1/(/:/%, ℃ becomes °C."""
    return unicodedata.normalize("NFKC", "" if text is None else str(text))


def normalize_text(text: Any) -> str:
    """Canonical form for string equality (see the module docstring); ``""`` for empty input."""
    text = _ARTICLES.sub("", nfkc(text))
    text = text.casefold().replace("%", " percent ")
    kept = {m.start() for m in _DIGIT_SEP.finditer(text)} | {m.start() for m in _LEADING_MINUS.finditer(text)}
    chars = []
    for i, ch in enumerate(text):
        cat = unicodedata.category(ch)
        drop = (cat.startswith("P") and i not in kept) or ch in _KEEP_SYMBOLS_OUT
        chars.append(" " if drop else ch)
    return _SPACES.sub(" ", "".join(chars)).strip()


# ---------------------------------------------------------------------------------------- yes / no

YES_WORDS = frozenset({"yes", "y", "yeah", "yep", "true", "correct", "positive", "present", "affirmative",
                       "是", "是的", "对", "对的", "正确", "阳性", "有"})
NO_WORDS = frozenset({"no", "n", "nope", "false", "incorrect", "negative", "absent", "not present",
                      "否", "不是", "不", "不对", "错", "错误", "阴性", "无", "没有"})
MAYBE_WORDS = frozenset({"maybe", "possibly", "perhaps", "uncertain", "unclear", "not sure", "inconclusive",
                         "可能", "也许", "不确定"})
_SYNONYMS = {**{w: "yes" for w in YES_WORDS}, **{w: "no" for w in NO_WORDS}, **{w: "maybe" for w in MAYBE_WORDS}}
# "Yes, ...", "No. ...", "是的，...": a synonym that opens the reply and is closed by punctuation.
_LEADING_WORD = re.compile(r"\s*([^\W\d_]+(?: (?:sure|present))?)\s*[,.;:!?，。；：！]")


def canonical_yes_no(text: Any, *, leading: bool = False) -> str | None:
    """``"yes"``/``"no"``/``"maybe"`` when ``text`` is one of their synonyms, else ``None``.

    Single letters (``y``/``n``) only count as the whole text, never as the opening word."""
    text = nfkc(text)
    word = _SYNONYMS.get(normalize_text(text)) if len(text) <= 40 else None
    if word is None and leading:
        m = _LEADING_WORD.match(text[:40])
        if m and len(m.group(1)) > 1:
            word = _SYNONYMS.get(m.group(1).casefold())
    return word


# ----------------------------------------------------------------------------------------- numbers

_MAX_QUANTITY_CHARS = 64
_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,2})?"
_ATOM = rf"[-+]?\s*(?:\(\s*[-+]?\s*)*{_NUM}(?:\s*\))*"
_QUANTITY = re.compile(rf"(?P<expr>{_ATOM}(?:\s*(?:\*\*|[-+*/^])\s*{_ATOM})*)\s*(?P<unit>.*)")
_BINARY_MINUS = re.compile(r"[\d.)]\s*-")  # "5-10": a range; refused (the "e-3" of 1e-3 is not matched)
_POWER = re.compile(r"\*\*\s*(?:\(\s*[-+]?\d{1,2}\s*\)|[-+]?\d{1,2})(?![\d.eE])")
_PAIR = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")  # 120/80, 20/40: a pair unless in lowest terms
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TIMES_TEN = re.compile(r"(?<=\d)\s*[x×·⋅]\s*(?=10\s*(?:\^|\*\*))")  # 5 x 10^9/L
_UNIT = re.compile(r"(?:%|°\s*[cf]|[a-zμ/][a-zμ0-9/*.·\s-]*)", re.I)
_UNIT_ALIASES = {"percent": "%", "percentage": "%", "mcg": "ug", "cc": "ml", "unit": "u", "units": "u",
                 "°c": "degc"}


@dataclass(frozen=True)
class Quantity:
    """An exact value (a sympy Rational) and a normalised unit (``""`` when there is none)."""

    value: Any
    unit: str


@functools.lru_cache(maxsize=1)
def _transformations() -> tuple:
    from sympy.parsing.sympy_parser import convert_xor, rationalize, standard_transformations

    return standard_transformations + (convert_xor, rationalize)


def _normalize_unit(unit: str) -> str:
    unit = _SPACES.sub("", unit.casefold()).rstrip(".")
    unit = unit.replace("μ", "u")
    return _UNIT_ALIASES.get(unit, unit)


@functools.lru_cache(maxsize=4096)
def parse_quantity(text: Any) -> Quantity | None:
    """Parse ``"1/2"``, ``"5 mg"``, ``"2^3"``, ``"50%"``, ``"5 x 10^9/L"`` ...; ``None`` for anything else."""
    text = nfkc(text).strip().rstrip(".。!;,").strip()
    if not text or len(text) > _MAX_QUANTITY_CHARS:
        return None
    text = text.replace("−", "-").replace("÷", "/").replace("^", "**")
    text = _TIMES_TEN.sub("*", _THOUSANDS.sub("", text)).replace("×", "*")
    m = _QUANTITY.fullmatch(text)
    if m is None:
        return None
    expr, unit = m.group("expr").strip(), m.group("unit").strip()
    if unit and (not _UNIT.fullmatch(unit) or len(unit) > 24 or len(unit.split()) > 2):
        return None  # "5 patients were enrolled": a sentence, not a quantity
    if _BINARY_MINUS.search(expr) or expr.count("(") != expr.count(")"):
        return None
    if (pair := _PAIR.fullmatch(expr)) and math.gcd(int(pair.group(1)), int(pair.group(2))) != 1:
        return None
    if expr.count("**") > 1 or len(_POWER.findall(expr)) != expr.count("**"):
        return None  # only one power, and only with a small literal integer exponent: no 9^9^9
    from sympy.parsing.sympy_parser import parse_expr

    try:  # the string is arithmetic on literals only (checked above), so parse_expr's eval is harmless
        value = parse_expr(expr, transformations=_transformations(), evaluate=True)
    except Exception:  # SyntaxError, TokenError, TypeError on odd bracket placement
        return None
    if not getattr(value, "is_Rational", False):
        return None  # zoo (1/0), nan
    return Quantity(value, _normalize_unit(unit))


def quantities_equal(a: Quantity, b: Quantity) -> bool:
    """Exact equality of value and unit."""
    return a.unit == b.unit and a.value == b.value


# -------------------------------------------------------------------------------------- containers

_THINK_CACHE: dict[str, re.Pattern[str]] = {}


def strip_think(text: str, tag: str = "think") -> str:
    """Drop ``<think>...</think>`` reasoning: closed blocks, everything up to a lone closing tag (the opening
    tag was in the prompt), and everything from an unclosed opening tag (a truncated reply)."""
    rx = _THINK_CACHE.setdefault(tag, re.compile(rf"<{re.escape(tag)}>.*?</{re.escape(tag)}>", re.S))
    text = rx.sub(" ", text)
    close, open_ = f"</{tag}>", f"<{tag}>"
    if close in text:
        text = text.rsplit(close, 1)[1]
    if open_ in text:
        text = text.split(open_, 1)[0]
    return text


def last_tag_content(text: str, tag: str = "answer") -> str | None:
    """Content of the last ``<tag>...</tag>`` (an unclosed last ``<tag>`` runs to the end); ``None`` if absent."""
    start = text.rfind(f"<{tag}>")
    if start < 0:
        return None
    body = text[start + len(tag) + 2:]
    end = body.find(f"</{tag}>")
    return body if end < 0 else body[:end]


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces matched); ``None`` if absent."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, begin = 1, starts[-1]
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None  # unbalanced: no reliable content


_LATEX_WRAPPERS = re.compile(r"\\(?:boxed|fbox|text|textbf|textit|mathrm|mathbf|mathit|operatorname)\s*\{([^{}]*)\}")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_SIMPLE = [(re.compile(r"\\(?:times|cdot)"), "*"), (re.compile(r"\\div"), "/"), (re.compile(r"\\%"), "%"),
                 (re.compile(r"\\(?:left|right|displaystyle|,|;|!|quad)"), " "), (re.compile(r"\\[()\[\]]|\$"), "")]


def unwrap_latex(text: str) -> str:
    """``\\text{C}`` -> ``C``, ``\\frac{1}{2}`` -> ``(1)/(2)``, ``\\times`` -> ``*``, ``\\%`` -> ``%``, no ``$``."""
    for _ in range(4):  # nested wrappers, innermost first
        new = _LATEX_FRAC.sub(r"(\1)/(\2)", _LATEX_WRAPPERS.sub(r"\1", text))
        if new == text:
            break
        text = new
    for rx, repl in _LATEX_SIMPLE:
        text = rx.sub(repl, text)
    return text.replace("{", "").replace("}", "").strip()
