"""StepGRPO's rewards as the R1-VL authors' training script computes them (`reward.faithful_to=code`).

Called by `megaapo.rewards.step` when `faithful_to="code"`. Each rule below is the one written out in shared
ALGORITHMS.md ("StepGRPO as the authors' code computes it"); docs/rewards.md tables where it differs from the paper.
Matches are exact and case-sensitive, on the raw response. The patterns are Python regular expressions, as in the
authors' Python script, so `\\d` and `\\s` keep Python's meaning: `\\d` also matches non-ASCII decimal digits
("### Step ２:" is step 2, `int` reads it) and `\\s` any Unicode whitespace. Pure functions returning floats.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional, Sequence

from megaapo.rewards.answers import inner_timeout

SECTIONS = ("### Image Description:", "### Rationales:", "### Step 1:", "### The final answer is:")
FINAL = "### The final answer is:"
STEP = re.compile(r"### Step (\d+):")
STEP_TEXT = re.compile(r"### Step \d+:\s*(.*?)(?=\n###|\Z)", re.DOTALL)
ANSWER_LINE = re.compile(r"### The final answer is:\s*\n?(.*)")


def step_rvr(text: str) -> float:
    """1.0 when the text is complete and logical by the code's rules, else 0.0.

    Complete: each of the four SECTIONS occurs somewhere (in any order). Logical: unless the stripped text ends
    with the final-answer header, the header's first occurrence starts at or after the end of the last
    `### Step \\d+:`; and the step numbers, in order of appearance, are exactly 1..n.
    """
    if not all(section in text for section in SECTIONS):
        return 0.0
    if not text.strip().endswith(FINAL):
        last_step_end = max(m.end() for m in STEP.finditer(text))   # "### Step 1:" is in the text: never empty
        if text.find(FINAL) < last_step_end:
            return 0.0
    numbers = [int(n) for n in STEP.findall(text)]
    return 1.0 if numbers == list(range(1, len(numbers) + 1)) else 0.0


def step_text(text: str) -> str:
    """Every step's text (after its header, up to the next line starting with `###` or the end), joined by one
    space and lower-cased."""
    return " ".join(STEP_TEXT.findall(text)).lower()


def key_step_fraction(text: str, key_steps: Optional[Sequence]) -> float:
    """Matched groups / groups (0 without groups). A group (a bare string is a one-form group) matches when any
    form, lower-cased, is a substring of `step_text`; an empty form matches everything, an empty group nothing."""
    if not key_steps:
        return 0.0
    combined = step_text(text)
    matched = sum(1 for group in key_steps
                  if any(form.lower() in combined for form in ([group] if isinstance(group, str) else group)))
    return matched / len(key_steps)


def _answer_line(text: str) -> str:
    """The first line after the first final-answer header, stripped; the whole stripped text without a header."""
    m = ANSWER_LINE.search(text)
    return m.group(1).strip() if m else text.strip()


@lru_cache(maxsize=4096)
def _parse_solution(solution: str) -> tuple:
    from math_verify import parse

    return tuple(parse(solution, parsing_timeout=inner_timeout()))


def _verifies(text: str, solution: str) -> bool:
    """math-verify on the WHOLE response against the whole solution, in the code's argument order; an exception
    counts as false."""
    from math_verify import parse, verify

    try:
        timeout = inner_timeout()
        return bool(verify(parse(text, parsing_timeout=timeout), list(_parse_solution(solution)),
                           timeout_seconds=timeout))
    except Exception:  # noqa: BLE001  (the code swallows every exception here)
        return False


def answer_reward(text: str, solution: str) -> float:
    """1.0 when math-verify equates the whole response with the solution, else when the answer lines are the same
    string (`_answer_line` of both), else 0.0."""
    if _verifies(text, solution):
        return 1.0
    return 1.0 if _answer_line(text) == _answer_line(solution) else 0.0


def step_rar(text: str, key_steps: Optional[Sequence], solution: str, alpha: float = 0.1) -> float:
    """answer + alpha * k: a response without a final-answer header can still earn 1 + alpha * k."""
    return answer_reward(text, solution) + alpha * key_step_fraction(text, key_steps)
