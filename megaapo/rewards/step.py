"""StepGRPO's rule-based step rewards (R1-VL): StepRAR (soft key-step matching) and StepRVR (validity).

Responses follow R1-VL's sectioned format:
    ### Image Description: ... ### Rationales: ... ### Let's think step by step.
    ### Step 1: ... ### Step n: ... ### The final answer is: <answer>
Two behaviours (`reward.faithful_to`): "paper" (the default, below) follows the R1-VL paper; "code" reproduces the
authors' training script rule by rule (`megaapo.rewards.step_code`). docs/rewards.md tables the differences and
lists every leniency of the paper mode's header matching. Pure functions returning floats; registered as rewards
in `megaapo.rewards`.

Paper mode reads a header as `###`, optional spaces or tabs, the header's words in any case separated by spaces or
tabs, and an optional colon (ASCII or full-width); a step number is ASCII digits followed by the colon, whitespace
or the end. A header that starts with the word "Step" but is not a numbered step ("### Step 1.", "### Step Two:",
"### Step ２:") is malformed: the response is not valid. Headers of other names ("### Conclusion:") are text.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from megaapo.rewards import step_code
from megaapo.rewards.answers import FINAL_ANSWER_WORDS, answer_after, answers_match, final_answers

HEADER = re.compile(
    r"###[ \t]*(?:(?P<description>image[ \t]+description[ \t]*[:：]?)"
    r"|(?P<rationales>rationales[ \t]*[:：]?)"
    r"|(?P<think>let['’]s[ \t]+think[ \t]+step[ \t]+by[ \t]+step[ \t]*[.:：]?)"
    r"|(?P<step>step[ \t]*(?P<number>[0-9]+)(?=[ \t]*[:：]|\s|$)[ \t]*[:：]?)"
    r"|(?P<malformed>step\b)"
    r"|(?P<final>" + FINAL_ANSWER_WORDS + r"))",
    re.IGNORECASE)
_KINDS = ("description", "rationales", "think", "step", "malformed", "final")


def _check_mode(faithful_to: str) -> None:
    if faithful_to not in ("paper", "code"):
        raise ValueError(f"faithful_to must be 'paper' or 'code', got {faithful_to!r}")


def headers(response: str) -> list[tuple[str, Optional[int], re.Match]]:
    """(kind, step number or None, match) of every paper-mode header, in order of appearance."""
    out = []
    for m in HEADER.finditer(response):
        kind = next(k for k in _KINDS if m.group(k) is not None)
        out.append((kind, int(m.group("number")) if kind == "step" else None, m))
    return out


def _paper_valid(response: str) -> bool:
    """Complete (description, rationales, >= 1 step, a non-empty final answer) and logical (exactly the headers
    description, rationales, the optional "Let's think" line, steps 1..n, one final answer, in that order)."""
    found = headers(response)
    kinds = [(kind, number) for kind, number, _ in found]
    if [k for k, _ in kinds[:2]] != ["description", "rationales"]:
        return False
    rest = kinds[2:]
    if rest[:1] == [("think", None)]:
        rest = rest[1:]
    steps = [number for kind, number in rest[:-1]]
    if not steps or rest[:-1] != [("step", n) for n in steps] or rest[-1:] != [("final", None)]:
        return False
    return steps == list(range(1, len(steps) + 1)) and bool(answer_after(response, found[-1][2].end()))


def step_sections(response: str) -> list[str]:
    """The text of each Step section before the first final-answer header: from the end of its header to the next
    `###` (any) or the end."""
    out = []
    for kind, _, m in headers(response):
        if kind == "final":
            break
        if kind == "step":
            end = response.find("###", m.end())
            out.append(response[m.end(): end if end >= 0 else len(response)])
    return out


def _squash(text: str) -> str:
    return " ".join(text.lower().split())


def key_step_fraction(response: str, key_steps: Optional[Sequence], faithful_to: str = "paper") -> float:
    """k = matched groups / groups, in [0, 1].

    paper: a group (a bare string is a one-form group) matches when any of its forms is inside one Step section,
    both lower-cased with runs of whitespace read as one space; a form that is empty or only whitespace never
    matches, and a group without any other form is left out of the count. code: `step_code.key_step_fraction`.
    """
    _check_mode(faithful_to)
    if faithful_to == "code":
        return step_code.key_step_fraction(response, key_steps)
    groups = [[_squash(f) for f in ([g] if isinstance(g, str) else g)] for g in key_steps or []]
    groups = [[f for f in forms if f] for forms in groups]
    groups = [forms for forms in groups if forms]
    if not groups:
        return 0.0
    sections = [_squash(s) for s in step_sections(response)]
    matched = sum(1 for forms in groups if any(f in s for f in forms for s in sections))
    return matched / len(groups)


def step_rar(response: str, key_steps: Optional[Sequence], gold_answer: str, alpha: float = 0.1,
             faithful_to: str = "paper", *, solution: Optional[str] = None, choices: Optional[Sequence[str]] = None,
             unit: str = "", precision: Optional[int] = None) -> float:
    """Step-wise Reasoning Accuracy Reward: answer + alpha * k, answer in {0, 1}.

    paper: 0 without a final answer (no final-answer header, or only empty ones); else answer = 1 when every
    final-answer line matches the gold answer (`answers_match`, with the row's choices, unit and precision).
    code: `step_code.step_rar` against the reference `solution` (the gold answer when the row has none).
    """
    _check_mode(faithful_to)
    if faithful_to == "code":
        return step_code.step_rar(response, key_steps, solution or gold_answer, alpha)
    answers = final_answers(response)
    if not any(answers):
        return 0.0
    correct = all(a and answers_match(a, gold_answer, choices=choices, unit=unit, precision=precision)
                  for a in answers)
    return float(correct) + alpha * key_step_fraction(response, key_steps)


def step_rvr(response: str, faithful_to: str = "paper") -> float:
    """Step-wise Reasoning Validity Reward: 1.0 if complete and logical, else 0.0 (`_paper_valid`, or
    `step_code.step_rvr`). Neither mode requires the "### Let's think step by step." line."""
    _check_mode(faithful_to)
    if faithful_to == "code":
        return step_code.step_rvr(response)
    return 1.0 if _paper_valid(response) else 0.0
