"""Group-relative advantage estimators (GRPO, Dr.GRPO, RLOO, REINFORCE++), registered by name.

Called by the training loop after rewards are scored; the Triton `kernels.group_advantage` computes the same
numbers in one launch and is tested against these functions.

Groups are given by an index, not a reshape, because groups may have different sizes (DAPO's filter, rows whose
generation failed): `group_index[i]` is the group of response i, ids in [0, num_groups).
All functions: rewards [B] float, group_index [B] long -> advantages [B] float32 (one value per response; the
loss broadcasts it over the response's tokens). Statistics are computed in float64.
"""

from __future__ import annotations

import torch

from megaapo.registry import Registry

ADVANTAGES = Registry("advantage estimator")


def group_stats(values: torch.Tensor, group_index: torch.Tensor, unbiased: bool = True):
    """Per-group count, mean and std of `values` [B] -> three [G] float64 tensors.

    The std of a one-element group is 0 (not NaN), so such a group's advantages are 0.
    """
    v = values.double()
    n_groups = int(group_index.max().item()) + 1 if group_index.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float64, device=v.device).index_add_(0, group_index, torch.ones_like(v))
    mean = torch.zeros_like(count).index_add_(0, group_index, v) / count.clamp(min=1)
    sq = torch.zeros_like(count).index_add_(0, group_index, (v - mean[group_index]) ** 2)
    denom = (count - 1).clamp(min=1) if unbiased else count.clamp(min=1)
    return count, mean, (sq / denom).sqrt()


@ADVANTAGES.register("grpo")
def grpo_advantage(rewards: torch.Tensor, group_index: torch.Tensor, eps: float = 1e-6,
                   unbiased: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps); a group whose rewards are all equal gets exactly 0 (even with eps=0)."""
    _, mean, std = group_stats(rewards, group_index, unbiased)
    centred = rewards.double() - mean[group_index]
    s = std[group_index]
    adv = torch.where(s > 0, centred / (s + eps), torch.zeros_like(centred))
    return adv.float()


@ADVANTAGES.register("drgrpo")
def drgrpo_advantage(rewards: torch.Tensor, group_index: torch.Tensor, eps: float = 0.0,
                     unbiased: bool = True) -> torch.Tensor:
    """Dr.GRPO: A_i = r_i - mean_g (no division by the std, which biases towards easy and hard prompts)."""
    _, mean, _ = group_stats(rewards, group_index, unbiased)
    return (rewards.double() - mean[group_index]).float()


@ADVANTAGES.register("rloo")
def rloo_advantage(rewards: torch.Tensor, group_index: torch.Tensor, eps: float = 0.0,
                   unbiased: bool = True) -> torch.Tensor:
    """RLOO: A_i = r_i - mean of the other responses of the group = n/(n-1) (r_i - mean_g); 0 for a lone response."""
    count, mean, _ = group_stats(rewards, group_index, unbiased)
    n = count[group_index]
    adv = (rewards.double() - mean[group_index]) * n / (n - 1).clamp(min=1)
    return torch.where(n > 1, adv, torch.zeros_like(adv)).float()


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp_advantage(rewards: torch.Tensor, group_index: torch.Tensor, eps: float = 1e-6,
                           unbiased: bool = True) -> torch.Tensor:
    """REINFORCE++: rewards whitened over the whole batch (no per-prompt baseline).

    The KL penalty is kept in the loss (algo.kl_coef), not folded into the reward as OpenRLHF does.
    """
    r = rewards.double()
    if r.numel() < 2:
        return torch.zeros_like(rewards, dtype=torch.float32)
    std = r.std(unbiased=unbiased)
    return ((r - r.mean()) / (std + eps) if std > 0 else torch.zeros_like(r)).float()


@ADVANTAGES.register("reinforce_pp_baseline")
def reinforce_pp_baseline_advantage(rewards: torch.Tensor, group_index: torch.Tensor, eps: float = 1e-6,
                                    unbiased: bool = True) -> torch.Tensor:
    """REINFORCE++-baseline: subtract the group mean, then whiten over the batch."""
    centred = drgrpo_advantage(rewards, group_index).double()
    if centred.numel() < 2:
        return torch.zeros_like(rewards, dtype=torch.float32)
    std = centred.std(unbiased=unbiased)
    return (centred / (std + eps) if std > 0 else torch.zeros_like(centred)).float()


def compute_advantages(name: str, rewards: torch.Tensor, group_index: torch.Tensor, eps: float,
                       unbiased: bool = True) -> torch.Tensor:
    return ADVANTAGES.get(name)(rewards, group_index, eps=eps, unbiased=unbiased)
