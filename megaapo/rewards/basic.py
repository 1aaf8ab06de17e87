"""The R1-style rewards: answer accuracy (math-verify) and the <think>/<answer> format."""

from __future__ import annotations

import re
from typing import Optional, Sequence

from megaapo.rewards.answers import ANSWER_TAG, answers_match, final_answers

R1_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def accuracy(response: str, gold_answer: str, choices: Optional[Sequence[str]] = None, unit: str = "",
             precision: Optional[int] = None) -> float:
    """1.0 when the response's answer equals the gold answer (`answers_match`: choice texts count for their
    letters, `unit` is ignored, floats compared to `precision`). The answer is the first `<answer>` tag's text (APO's
    rule); without a tag, every `### The final answer is:` line must hold it (a response listing two final answers
    is not rewarded for either)."""
    tag = ANSWER_TAG.search(response)
    answers = [tag.group(1).strip()] if tag else final_answers(response)
    ok = bool(answers) and all(answers_match(a, gold_answer, choices=choices, unit=unit, precision=precision)
                               for a in answers)
    return 1.0 if ok else 0.0


def r1_format(response: str) -> float:
    """1.0 when the response is `<think>...</think> <answer>...</answer>` with exactly one of each tag."""
    if any(response.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return 0.0
    return 1.0 if R1_FORMAT.match(response) else 0.0

