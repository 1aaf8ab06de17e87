"""APO (Asymmetric Policy Optimization, View-R1): DADS KL weights for positives, STCR multipliers for negatives.

Called by the training loop after advantages are computed; the results feed the policy loss as a per-sequence KL
weight (`kl_weight`) and a per-sequence advantage multiplier. Formulas and the paper/code differences are in
shared ALGORITHMS.md; the defaults follow the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megaapo.algos.advantages import group_stats


def dads_weight(difficulty: torch.Tensor) -> torch.Tensor:
    """Difficulty-Adaptive Divergence Shaping: f(d) = 1 - exp(-e (1 - d)) for 0 < d < 1, and f(0) = f(1) = 1.

    difficulty [...] = 1 - (#correct in the group)/G -> weights [...] (same shape, float32). Hard prompts (d near 1)
    get a small KL weight, so their rare correct answers may move further from the reference.
    """
    d = difficulty.double()
    w = 1.0 - torch.exp(-math.e * (1.0 - d))
    interior = (d > 0) & (d < 1)
    return torch.where(interior, w, torch.ones_like(w)).float()


def stcr_multiplier(delta_tokens: torch.Tensor, base: float = 1.00001) -> torch.Tensor:
    """Suboptimal Trajectory Complexity Regularization: 2 - base**(-delta) where delta > 0, else 1; in [1, 2).

    delta_tokens [...] = length of a wrong response minus the mean length of its group's correct ones.
    With the authors' base 1.00001 the multiplier is only 1.01 at +1000 tokens (make `stcr_base` larger for effect).
    """
    delta = delta_tokens.double()
    m = 2.0 - torch.pow(torch.tensor(base, dtype=torch.float64, device=delta.device), -delta)
    return torch.where(delta > 0, m, torch.ones_like(m)).float()


@dataclass
class APOShaping:
    """Per-response outputs of `apo_shaping`, all [B] float32."""
    kl_weight: torch.Tensor        # DADS weight for positives, 1 for the rest
    adv_multiplier: torch.Tensor   # STCR multiplier for over-long negatives, 1 for the rest
    difficulty: torch.Tensor       # the response's group difficulty d
    positive: torch.Tensor         # bool: which responses DADS treated as positive


def apo_shaping(correct: torch.Tensor, lengths: torch.Tensor, advantages: torch.Tensor, group_index: torch.Tensor,
                *, dads: bool = True, stcr: bool = True, stcr_base: float = 1.00001,
                faithful_to: str = "paper") -> APOShaping:
    """DADS and STCR for one rollout batch.

    correct [B] bool (accuracy reward = 1), lengths [B] response tokens, advantages [B], group_index [B] long.
    faithful_to="paper": positives are the correct responses; STCR only amplifies negatives with A < 0.
    faithful_to="code":  positives are responses with A > 0 (the authors' code); STCR amplifies every wrong,
                         over-long response of a group with a correct one, whatever the sign of A.
    """
    if faithful_to not in ("paper", "code"):
        raise ValueError(f"faithful_to must be 'paper' or 'code', got {faithful_to!r}")
    correct = correct.bool()
    ones = torch.ones_like(advantages, dtype=torch.float32)
    count, acc, _ = group_stats(correct.double(), group_index)
    difficulty = (1.0 - acc)[group_index].float()
    positive = correct if faithful_to == "paper" else advantages > 0

    kl_weight = torch.where(positive, dads_weight(difficulty), ones) if dads else ones

    if stcr:
        n_correct = (acc * count)[group_index]
        len_correct = torch.zeros_like(count).index_add_(0, group_index, torch.where(correct, lengths.double(), 0.0))
        mean_correct_len = (len_correct / (acc * count).clamp(min=1))[group_index]
        eligible = (~correct) & (n_correct > 0)
        if faithful_to == "paper":
            eligible &= advantages < 0
        mult = stcr_multiplier(lengths.double() - mean_correct_len, stcr_base)
        adv_multiplier = torch.where(eligible, mult, ones)
    else:
        adv_multiplier = ones
    return APOShaping(kl_weight=kl_weight.float(), adv_multiplier=adv_multiplier.float(), difficulty=difficulty,
                      positive=positive)
