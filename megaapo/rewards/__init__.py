"""Rewards: pure functions registered by name, combined by weight (`reward.functions`), scored in a worker pool.

    from megaapo.rewards import RewardInput, REWARDS
    REWARDS["accuracy"](RewardInput(response, answer="3"))        # -> 1.0 or 0.0
    REWARDS["accuracy"](RewardInput(response, answer="B", choices=["130°", "145°"]))   # "145" scores 1.0

APO's reward is `{accuracy: 1.0, format: 0.5}` (values 0, 0.5, 1, 1.5); StepGRPO's is `{step_rar: 1, step_rvr: 1}`,
following the R1-VL paper (`faithful_to="paper"`) or the authors' script (`"code"`; docs/rewards.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megaapo.registry import Registry
from megaapo.rewards.basic import accuracy, r1_format
from megaapo.rewards.step import step_rar, step_rvr


@dataclass
class RewardInput:
    """What a reward function sees of one response."""
    response: str
    answer: str
    key_steps: Optional[list] = None          # list of groups of equivalent surface forms
    alpha: float = 0.1                        # StepRAR's weight of the matched key-step fraction
    faithful_to: str = "paper"                # StepRAR/StepRVR: "paper" or "code" (R1-VL's script)
    solution: Optional[str] = None            # reference solution: faithful_to="code" checks the answer against it
    meta: dict = field(default_factory=dict)
    choices: Optional[list[str]] = None       # the texts of choices A, B, ... (a letter gold accepts B's text)
    unit: str = ""                            # ignored after a number ("5 cm" for gold "5", unit "cm")
    precision: Optional[int] = None           # decimals both numbers are rounded to before comparing


REWARDS = Registry("reward")


@REWARDS.register("accuracy")
def _accuracy(x: RewardInput) -> float:
    return accuracy(x.response, x.answer, choices=x.choices, unit=x.unit, precision=x.precision)


@REWARDS.register("format")
def _format(x: RewardInput) -> float:
    return r1_format(x.response)


@REWARDS.register("step_rar")
def _step_rar(x: RewardInput) -> float:
    return step_rar(x.response, x.key_steps, x.answer, alpha=x.alpha, faithful_to=x.faithful_to, solution=x.solution,
                    choices=x.choices, unit=x.unit, precision=x.precision)


@REWARDS.register("step_rvr")
def _step_rvr(x: RewardInput) -> float:
    return step_rvr(x.response, faithful_to=x.faithful_to)


def score_components(x: RewardInput, names: list[str]) -> dict[str, float]:
    """Every named component for one response (runs inside a reward worker)."""
    return {name: float(REWARDS.get(name)(x)) for name in names}


__all__ = ["REWARDS", "RewardInput", "accuracy", "r1_format", "score_components", "step_rar", "step_rvr"]
