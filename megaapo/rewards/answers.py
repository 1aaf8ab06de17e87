"""Answer extraction and checking shared by every reward, the data loader and evaluation.

Two output styles: R1's `<answer>...</answer>` and R1-VL's `### The final answer is: ...`. Gold and predicted
answers are compared with the `math-verify` library (parse both, compare); multiple-choice letters are compared as
letters; text that math-verify cannot parse falls back to a normalised exact match.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache
from typing import Optional

# math-verify logs the whole offending input on every timeout (megabytes for a pathological response).
logging.getLogger("math_verify").setLevel(logging.CRITICAL)

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FINAL_ANSWER = re.compile(r"###\s*The final answer is\s*:?", re.IGNORECASE)
CHOICE = re.compile(r"^\s*\(?\s*([A-Ha-h])\s*\)?\s*[\.\):]?\s*$")
CHOICE_PREFIX = re.compile(r"^\s*\(?\s*([A-H])\s*(?:\)|\.|:|\s|$)")
CHOICE_ANYWHERE = re.compile(r"\(([A-H])\)")
# math-verify's own timeouts use SIGALRM, which only the main thread may set. In-process scoring uses them; the
# reward worker pool turns them off (`set_inner_timeout(None)`) and enforces its own per-response timeout, which
# kills the worker and counts the response, so every timeout is visible in the metrics.
_INNER_TIMEOUT_S: Optional[int] = 2


def set_inner_timeout(seconds: Optional[int]) -> None:
    global _INNER_TIMEOUT_S
    _INNER_TIMEOUT_S = seconds


def extract_answer(response: str) -> Optional[str]:
    """The answer text of a response, or None when it has neither an `<answer>` tag pair nor a final-answer line."""
    m = ANSWER_TAG.search(response)
    if m:
        return m.group(1).strip()
    m = FINAL_ANSWER.search(response)
    if m:
        rest = response[m.end():]
        nxt = rest.find("###")
        return (rest[:nxt] if nxt >= 0 else rest).strip()
    return None


def choice_letter(text: str) -> Optional[str]:
    """'B', '(b)', 'B.' -> 'B'; None when the text is not a bare choice letter."""
    m = CHOICE.match(text)
    return m.group(1).upper() if m else None


def _predicted_letter(text: str) -> Optional[str]:
    m = CHOICE_PREFIX.match(text) or CHOICE_ANYWHERE.search(text)
    return m.group(1) if m else None


def normalise(text: str) -> str:
    t = text.strip().lower()
    t = re.sub(r"\\text\{([^}]*)\}", r"\1", t)
    t = t.replace("$", "").replace("\\,", "").replace("\\!", "")
    t = re.sub(r"\s+", "", t)
    return t.rstrip(".")


def _timeout() -> Optional[int]:
    return _INNER_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=65536)
def _parse(text: str) -> tuple:
    """math-verify's parse of an answer, or () when it yields no mathematical object (only echoed text)."""
    from math_verify import parse

    # A bare answer is wrapped in $...$ so LaTeX such as \frac{1}{2} is read as math (math-verify's advice for
    # gold answers); plain numbers parse either way.
    wrapped = text if "$" in text or "\\boxed" in text else f"${text}$"
    try:
        result = parse(wrapped, parsing_timeout=_timeout())
    except Exception:  # noqa: BLE001  (math-verify raises assorted sympy errors on odd input: unparsable)
        return ()
    return tuple(result) if any(not isinstance(r, str) for r in result) else ()


def gold_is_parsable(gold: str) -> bool:
    """A gold answer the checker can use: a choice letter or anything math-verify parses."""
    if not gold or not gold.strip():
        return False
    return choice_letter(gold) is not None or bool(_parse(gold.strip()))


_WORD = re.compile(r"[A-Za-z][A-Za-z' -]{2,}")


def answers_match(pred: Optional[str], gold: str) -> bool:
    """Is the predicted answer text equal to the gold answer? Letters as letters, math by math-verify."""
    if pred is None or not pred.strip():
        return False
    gold_letter = choice_letter(gold)
    if gold_letter is not None:
        return _predicted_letter(pred.strip()) == gold_letter
    if normalise(pred) == normalise(gold):
        return True
    if _WORD.fullmatch(gold.strip()):
        # A word answer (a colour, a name) is compared as text: math-verify would read "red" as r*e*d, slowly.
        return False
    g, p = _parse(gold.strip()), _parse(pred.strip())
    if g and p:
        from math_verify import verify

        try:
            if verify(list(g), list(p), timeout_seconds=_timeout()):
                return True
        except Exception:  # noqa: BLE001
            pass
    return normalise(pred) == normalise(gold)
