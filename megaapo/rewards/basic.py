"""The R1-style rewards: answer accuracy (math-verify) and the <think>/<answer> format."""

from __future__ import annotations

import re
from megaapo.rewards.answers import answers_match, extract_answer

R1_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def accuracy(response: str, gold_answer: str) -> float:
    """1.0 when the response's answer (`<answer>` tag or `### The final answer is:`) equals the gold answer."""
    return 1.0 if answers_match(extract_answer(response), gold_answer) else 0.0


def r1_format(response: str) -> float:
    """1.0 when the response is `<think>...</think> <answer>...</answer>` with exactly one of each tag."""
    if any(response.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return 0.0
    return 1.0 if R1_FORMAT.match(response) else 0.0

