"""DAPO's batch-level pieces: dynamic sampling (drop groups with all-equal rewards) and the soft overlong penalty.

Called by the training loop between reward scoring and advantage computation.
"""

from __future__ import annotations

import torch

from megaapo.algos.advantages import group_stats


def dynamic_sampling_keep(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """rewards [B], group_index [B] -> keep [B] bool: False for every response of a group whose rewards are all
    equal (its advantages would be 0, so it only dilutes the batch)."""
    count, _, std = group_stats(rewards, group_index, unbiased=False)
    return (std > 0)[group_index] & (count[group_index] > 1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward: 0 up to max_len - buffer, then falling linearly to
    -penalty at max_len (and -penalty beyond). lengths [B] -> [B] float32."""
    if buffer <= 0 or buffer > max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}], got {buffer}")
    start = max_len - buffer
    frac = (lengths.double() - start) / buffer
    return (-penalty * frac.clamp(min=0.0, max=1.0)).float()


def regroup(group_index: torch.Tensor) -> torch.Tensor:
    """Renumber the surviving group ids (after filtering) to 0..n-1, keeping their order of first appearance."""
    _, inverse = torch.unique(group_index, sorted=True, return_inverse=True)
    return inverse
