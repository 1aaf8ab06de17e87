"""Answer extraction and checking shared by every reward, the data loader and evaluation.

Two output styles: R1's `<answer>...</answer>` and R1-VL's `### The final answer is: ...` line. Comparison, cheapest
first (this runs on every training response):
  choice letters   gold "B" matches "B", "(B)", "B) 145°", "The answer is (B)", and, when the choices are known, the
                   text (or value) of choice B; a prediction naming another choice's text is wrong;
  plain numbers    decimals and fractions ("0.5", "1/2", "\\frac12") compared exactly, after dropping a trailing
                   unit (the row's `unit`, a `\\text{...}`), degree sign or percent sign ("50%" is 50 or 0.5); with
                   a `precision` both are rounded to that many decimals first (MathVista's rule);
  words            an answer made of letters only ("red", "Larger than") is compared as text, case ignored;
  anything else    the `math-verify` library (parse both, compare).

No normalisation may turn a wrong answer into a right one. Whitespace, control and format characters and LaTeX
spacing commands are *separators*: one between two letters, two digits, or a digit and a decimal point or comma
splits a token and is kept ("1 2" is not "12", "re d" is not "red", "3\\x00\\x003" is not 3); anywhere else
("x = 3", "(1, 2)", "9 \\pi") it is dropped. math-verify never sees a number split by a separator (it reads "1 2"
as 3 and "3\\x00\\x003" as 3). The rules and what was found are listed in docs/rewards.md ("Answer matching").
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple, Optional, Sequence

# math-verify logs the whole offending input on every timeout (megabytes for a pathological response).
logging.getLogger("math_verify").setLevel(logging.CRITICAL)

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# R1-VL's final-answer header as megaapo reads it (StepRVR/StepRAR's paper mode use the same grammar): any case,
# spaces or tabs after `###` and between the words, the colon optional (ASCII or full-width).
FINAL_ANSWER_WORDS = r"the[ \t]+final[ \t]+answer[ \t]+is\b[ \t]*[:：]?"
FINAL_ANSWER = re.compile(r"###[ \t]*" + FINAL_ANSWER_WORDS, re.IGNORECASE)
CHOICE = re.compile(r"^\s*\(?\s*([A-Ha-h])\s*\)?\s*[\.\):]?\s*$")
# A leading letter must be closed by ")", "." or ":" (or end the answer): "A triangle" is not choice A.
CHOICE_PREFIX = re.compile(r"^\(? ?([A-H]) ?(?:\)|\.|:|$)")
CHOICE_ANYWHERE = re.compile(r"\(([A-H])\)")
# math-verify's own timeouts use SIGALRM, which only the main thread may set. In-process scoring uses them; the
# reward worker pool turns them off (`set_inner_timeout(None)`) and enforces its own per-response timeout, which
# kills the worker and counts the response, so every timeout is visible in the metrics.
_INNER_TIMEOUT_S: Optional[int] = 2


def set_inner_timeout(seconds: Optional[int]) -> None:
    global _INNER_TIMEOUT_S
    _INNER_TIMEOUT_S = seconds


def inner_timeout() -> Optional[int]:
    """math-verify's timeout for this thread: None outside the main thread (SIGALRM cannot be set there)."""
    return _INNER_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


# ------------------------------------------------------------------------------------------------- extraction
def final_answers(response: str) -> list[str]:
    """The answer of every final-answer header, in order: the first non-blank line after the header, cut at a
    following `###`, stripped ("" when nothing follows)."""
    return [answer_after(response, m.end()) for m in FINAL_ANSWER.finditer(response)]


def answer_after(response: str, pos: int) -> str:
    """The first non-blank line from `pos` on, cut at a `###`, stripped."""
    line = re.split(r"[\r\n]", response[pos:].lstrip(), maxsplit=1)[0]
    return line.split("###", 1)[0].strip()


def extract_answer(response: str) -> Optional[str]:
    """The answer text of a response (the first `<answer>` tag, else the first final-answer line), or None when it
    has neither."""
    m = ANSWER_TAG.search(response)
    if m:
        return m.group(1).strip()
    answers = final_answers(response)
    return answers[0] if answers else None


# ------------------------------------------------------------------------------------------------- separators
# LaTeX spacing commands, line breaks, the non-breaking `~` and an empty group `{}` separate like a space.
_LATEX_SPACE = re.compile(r"\\\\|\\[,:;! ]|\\(?:q?quad|enspace|thinspace|medspace|thickspace|negthinspace|newline|"
                          r"hfill)(?![A-Za-z])|\\hspace\*?\s*\{[^{}]*\}|~|\{\}")
# Combining marks, private-use, unassigned and surrogate code points: a number or word carrying one ("0.3̄") is not
# the plain number or word, and math-verify would silently drop the mark.
_OPAQUE = {"Mn", "Me", "Co", "Cn", "Cs"}
# \text{...} and friends: unwrapped (with separators around) for text comparison
_TEXT_WRAP = re.compile(r"\\(?:text|mathrm|textrm|mbox)\s*\{([^{}]*)\}")
# Logical or/and: math-verify reads "3 \\lor 4" as 4, which would reward a hedge.
_HEDGE = re.compile(r"\\(?:lor|vee|land|wedge)(?![A-Za-z])")


def _is_separator(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf")


def spaced(text: str) -> str:
    """Every run of separators as one space, both ends stripped. Merges nothing: a split token stays split."""
    t = _LATEX_SPACE.sub(" ", text)
    if not (t.isascii() and t.isprintable()):   # printable ASCII has no separator but the space
        t = "".join(" " if _is_separator(c) else c for c in t)
    return re.sub(" {2,}", " ", t).strip()


def _splits_token(a: str, b: str) -> bool:
    """Does a separator between characters a and b split what would otherwise be one token?"""
    return (a.isalpha() and b.isalpha()) or (a.isdigit() and (b.isdigit() or b in ".,")) or (a == "." and b.isdigit())


def _token_spaces(t: str) -> list[int]:
    """Positions of the spaces of a `spaced` text that split a token."""
    return [i for i, c in enumerate(t) if c == " " and _splits_token(t[i - 1], t[i + 1])]


def canonical(text: str) -> str:
    """`spaced`, then only the spaces that split a token are kept: "x = 3" -> "x=3", "1 2" stays "1 2"."""
    t = spaced(text)
    keep = set(_token_spaces(t))
    return "".join(c for i, c in enumerate(t) if c != " " or i in keep)


def _mathable(t: str) -> bool:
    """May math-verify read this `spaced` text? Not with a number split by a separator, an opaque character or a
    logical or/and. A `\\text{}` counts as separated from its neighbours (math-verify drops it: "3\\text{4}" is 3)."""
    t = spaced(_TEXT_WRAP.sub(r" \1 ", t))
    if any(t[i - 1].isdigit() or t[i + 1].isdigit() for i in _token_spaces(t)):
        return False
    return not _HEDGE.search(t) and not any(unicodedata.category(c) in _OPAQUE for c in t if not c.isascii())


def is_text(t: str) -> bool:
    """An answer made of words only: letters, spaces, apostrophes and hyphens, with at least two letters."""
    return sum(c.isalpha() for c in t) >= 2 and all(c.isalpha() or c in " '’-" for c in t)


def normalise(text: str) -> str:
    """The text two answers are compared by: `canonical` without `$` and `\\text{}` wrappers and one final full
    stop; words lower-cased. Only whitespace that joins nothing is removed, so no two tokens merge."""
    t = canonical(_TEXT_WRAP.sub(r" \1 ", text).replace("$", " "))
    if t.endswith("."):
        t = t[:-1].rstrip()
    return t.lower() if is_text(t) else t


# ------------------------------------------------------------------------------------------------- math-verify
@lru_cache(maxsize=65536)
def _parse(text: str) -> tuple:
    """math-verify's parse of a `spaced` answer, or () when it yields no mathematical object (only echoed text) or
    the answer may not go to math-verify (`_mathable`)."""
    from math_verify import parse

    if not _mathable(text):
        return ()
    # A bare answer is wrapped in $...$ so LaTeX such as \frac{1}{2} is read as math (math-verify's advice for
    # gold answers); plain numbers parse either way.
    wrapped = text if "$" in text or "\\boxed" in text else f"${text}$"
    try:
        result = parse(wrapped, parsing_timeout=inner_timeout())
    except Exception:  # noqa: BLE001  (math-verify raises assorted sympy errors on odd input: unparsable)
        return ()
    return tuple(result) if any(not isinstance(r, str) for r in result) else ()


def gold_is_parsable(gold: str) -> bool:
    """A gold answer the checker can use: a choice letter or anything math-verify parses."""
    g = spaced(gold or "")
    return bool(g) and (choice_letter(g) is not None or bool(_parse(g)))


def _math_equal(pred: str, gold: str) -> bool:
    g, p = _parse(gold), _parse(pred)
    if g and p:
        from math_verify import verify

        try:
            return bool(verify(list(g), list(p), timeout_seconds=inner_timeout()))
        except Exception:  # noqa: BLE001
            pass
    return False


# ------------------------------------------------------------------------------------------------- numbers
_BOXED = re.compile(r"^\\boxed\s*\{(.*)\}$", re.DOTALL)
# a trailing \text{cm}: letters, never digits (a "\text{4}" is part of the answer, not a unit)
_TEXT_UNIT = re.compile(r"\\(?:text|mathrm|mbox|rm)\s*\{[^{}0-9]*[A-Za-z][^{}0-9]*\}$")
_DEGREE = re.compile(r"(?:\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°|\bdeg(?:rees?)?)$", re.IGNORECASE)
_PERCENT = re.compile(r"\\?%$")
_DECIMAL = re.compile(r"^[+-]? ?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]*)?$|^[+-]? ?\.[0-9]+$")
_FRACTION = re.compile(r"^([+-]?) ?\\[dt]?frac ?(?:\{ ?([0-9]+) ?\}|([0-9])) ?(?:\{ ?([0-9]+) ?\}|([0-9]))$|"
                       r"^([+-]?) ?([0-9]+) ?/ ?([0-9]+)$")


class _Number(NamedTuple):
    value: Fraction
    percent: bool      # written with a trailing % (may mean value/100)
    decimal: bool      # written as a decimal, not a fraction


def strip_unit(text: str, unit: str) -> str:
    """'5 cm' -> '5' for unit 'cm' (also '5cm', '5 \\text{cm}'); the unit must not continue a word ('5 cm' is kept
    for unit 'm')."""
    t, u = text.strip(), unit.strip()
    if not u:
        return t
    for form in (f"\\text{{{u}}}", f"\\mathrm{{{u}}}", f"\\text{{ {u}}}", u):
        if t.lower().endswith(form.lower()):
            head = t[: len(t) - len(form)]
            if not (form == u and u[0].isalpha() and head[-1:].isalpha()):
                return head.rstrip()
    return t


def _number(text: str) -> Optional[_Number]:
    """A plain number (decimal or fraction) with an optional trailing unit, degree or percent sign; else None.
    `text` is `spaced`; a space never joins digits here (the patterns allow none inside a number)."""
    t = spaced(text.replace("$", " "))
    if t.endswith("."):
        t = t[:-1].rstrip()
    m = _BOXED.match(t)
    if m:
        t = m.group(1).strip()
    percent = False
    for _ in range(2):   # at most a unit and then a sign: "90 \\text{deg}", "5^\\circ"
        if _PERCENT.search(t):
            t, percent = _PERCENT.sub("", t).rstrip(), True
        else:
            t = _DEGREE.sub("", _TEXT_UNIT.sub("", t).rstrip()).rstrip()
    if _DECIMAL.match(t):
        return _Number(Fraction(t.replace(",", "").replace(" ", "")), percent, True)
    m = _FRACTION.match(t)
    if m:
        sign, num, den = (m.group(1), m.group(2) or m.group(3), m.group(4) or m.group(5)) if m.group(1) is not None \
            else (m.group(6), m.group(7), m.group(8))
        if int(den) != 0:
            return _Number(Fraction(int(num), int(den)) * (-1 if sign == "-" else 1), percent, False)
    return None


def _numbers_equal(p: _Number, g: _Number, precision: Optional[int]) -> bool:
    """Equal as written, or with a % read as /100; with a precision, after rounding both (Python's round, as
    MathVista's scorer does)."""
    preds = {p.value, p.value / 100} if p.percent else {p.value}
    golds = {g.value, g.value / 100} if g.percent else {g.value}
    if precision is None:
        return not preds.isdisjoint(golds)
    return any(round(float(a), precision) == round(float(b), precision) for a in preds for b in golds)


def _parsed_number(text: str) -> Optional[_Number]:
    """A literal number math-verify reads from the text (it drops text units); None for anything else, including
    expressions such as 9^{9^9} that would have to be evaluated."""
    for r in _parse(text)[:1]:
        if getattr(r, "is_Float", False) or getattr(r, "is_Rational", False):
            return _Number(Fraction(str(r)), False, True)
    return None


# ------------------------------------------------------------------------------------------------- matching
def values_match(pred: str, gold: str, unit: str = "", precision: Optional[int] = None) -> bool:
    """Is the predicted value the gold value? (no choice letters here: see `answers_match`)"""
    pred, gold = strip_unit(spaced(pred), unit), strip_unit(spaced(gold), unit)
    p_text, g_text = normalise(pred), normalise(gold)
    if p_text == g_text:
        return True
    if p_text.replace(" ", "").lower() == g_text.replace(" ", "").lower():
        return False   # the same characters, tokenised differently ("1 2" vs "12"): never the same answer
    p, g = _number(pred), _number(gold)
    if p is None and g is not None and precision is not None:
        p = _parsed_number(pred)   # "1.449 m" without a unit field: the precision rule still applies
    if p is not None and g is not None:
        if _numbers_equal(p, g, precision):
            return True
        if precision is not None or (p.decimal and g.decimal):
            return False   # math-verify cannot do better on two decimals, and must not undo the rounding rule
    if is_text(g_text):
        # A word answer (a colour, a name) is compared as text: math-verify would read "red" as r*e*d, slowly.
        return False
    return _math_equal(pred, gold)


def choice_letter(text: str) -> Optional[str]:
    """'B', '(b)', 'B.' -> 'B'; None when the text is not a bare choice letter."""
    m = CHOICE.match(text)
    return m.group(1).upper() if m else None


def _predicted_letter(text: str) -> Optional[str]:
    """The one letter a prediction names, leading ("B) 145°", "(B)", "B.") or in parentheses ("the answer is (B)");
    a prediction naming two different letters ("(A) or (B)") names no choice: a hedge is not an answer."""
    m = CHOICE_PREFIX.match(text)
    found = set(CHOICE_ANYWHERE.findall(text)) | ({m.group(1)} if m else set())
    return found.pop() if len(found) == 1 else None


def _chosen_letter(pred: str, choices: Optional[Sequence[str]], unit: str) -> Optional[str]:
    """The choice a prediction names: its letter, else the choice whose text it is, else the one whose value it
    equals (only when exactly one does)."""
    letter = choice_letter(pred)
    if letter is not None:
        return letter
    if choices:
        same = [i for i, c in enumerate(choices[:8]) if normalise(c) == normalise(pred)]
        if len(same) == 1:
            return "ABCDEFGH"[same[0]]
    letter = _predicted_letter(pred)
    if letter is not None or not choices:
        return letter
    same = [i for i, c in enumerate(choices[:8]) if values_match(pred, c, unit)]
    return "ABCDEFGH"[same[0]] if len(same) == 1 else None


def answers_match(pred: Optional[str], gold: str, choices: Optional[Sequence[str]] = None, unit: str = "",
                  precision: Optional[int] = None) -> bool:
    """Is the predicted answer text equal to the gold answer? Letters as letters (or as the choices' texts when
    `choices` is given), numbers exactly or to `precision` decimals ignoring `unit`, words as text, the rest by
    math-verify; never two answers that differ in a token (module docstring)."""
    if pred is None:
        return False
    pred, gold = spaced(pred), spaced(gold)
    if not pred:
        return False
    gold_letter = choice_letter(gold)
    if gold_letter is not None:
        return _chosen_letter(pred, choices, unit) == gold_letter
    if choices:
        letter = choice_letter(pred)
        if letter is not None and ord(letter) - ord("A") < len(choices):
            pred = choices[ord(letter) - ord("A")]   # a letter for a gold given as text: compare the choice's text
    return values_match(pred, gold, unit, precision)
