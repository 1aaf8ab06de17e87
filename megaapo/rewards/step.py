"""StepGRPO's rule-based step rewards (R1-VL): StepRAR (soft key-step matching) and StepRVR (validity).

Responses follow R1-VL's sectioned format:
    ### Image Description: ... ### Rationales: ... ### Let's think step by step.
    ### Step 1: ... ### Step n: ... ### The final answer is: <answer>
Pure functions returning floats; registered as rewards in `megaapo.rewards`.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from megaapo.rewards.answers import FINAL_ANSWER, answers_match, extract_answer

DESCRIPTION = re.compile(r"###\s*Image Description\s*:", re.IGNORECASE)
RATIONALES = re.compile(r"###\s*Rationales\s*:", re.IGNORECASE)
THINK = re.compile(r"###\s*Let's think step by step\s*\.?", re.IGNORECASE)
STEP = re.compile(r"###\s*Step\s*(\d+)\s*:?", re.IGNORECASE)


def step_text(response: str) -> str:
    """The lower-cased text of the Step sections: from the first `### Step` header to the final-answer line."""
    first = STEP.search(response)
    if first is None:
        return ""
    end = FINAL_ANSWER.search(response, first.start())
    return response[first.start(): end.start() if end else len(response)].lower()


def key_step_fraction(response: str, key_steps: Optional[Sequence[Sequence[str]]]) -> float:
    """k = matched groups / groups; a group matches when any of its surface forms, lower-cased, is a substring
    of the lower-cased Step sections."""
    if not key_steps:
        return 0.0
    text = step_text(response)
    matched = sum(1 for forms in key_steps if any(f and f.lower() in text for f in forms))
    return matched / len(key_steps)


def step_rar(response: str, key_steps: Optional[Sequence[Sequence[str]]], gold_answer: str, alpha: float = 0.1,
             faithful_to: str = "paper") -> float:
    """Step-wise Reasoning Accuracy Reward: 1 + alpha*k if the final answer is correct, alpha*k if an answer is
    given but wrong, 0 without a final-answer line (paper; faithful_to="code" still pays alpha*k there)."""
    k = key_step_fraction(response, key_steps)
    answer = extract_answer(response) if FINAL_ANSWER.search(response) else None
    if answer is None:
        return alpha * k if faithful_to == "code" else 0.0
    return (1.0 if answers_match(answer, gold_answer) else 0.0) + alpha * k


def step_rvr(response: str, faithful_to: str = "paper") -> float:
    """Step-wise Reasoning Validity Reward: 1 if complete and logical, else 0.

    Complete: the Image Description, Rationales, "Let's think step by step" and final-answer headers are present,
    with at least one Step. Logical: first occurrences ordered Description < Rationales < Let's think < Step 1 <
    ... < Step n < final answer, and the steps are numbered 1..n in order. faithful_to="code" skips the
    Description < Rationales < Step 1 ordering, as the authors' code does.
    """
    desc, rat, think = DESCRIPTION.search(response), RATIONALES.search(response), THINK.search(response)
    final = FINAL_ANSWER.search(response)
    steps = list(STEP.finditer(response))
    if not (desc and rat and think and final and steps):
        return 0.0
    numbers = [int(m.group(1)) for m in steps]
    if numbers != list(range(1, len(numbers) + 1)):
        return 0.0
    if steps[-1].start() > final.start():
        return 0.0
    if faithful_to == "paper" and not (desc.start() < rat.start() < think.start() < steps[0].start()):
        return 0.0
    return 1.0
