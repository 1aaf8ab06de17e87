"""Rollout/learner log-prob mismatch: metrics and the truncated importance-sampling (TIS) weight.

Called by the RL loop after the learner recomputes old-policy log-probs for a rollout batch: the engine sampled
with its own kernels (and possibly another dtype), so its log-probs of the sampled tokens differ slightly from the
learner's. The metrics watch that gap; the TIS weight min(p_old / p_rollout, cap) corrects the policy gradient
for it (`policy_loss(..., tis_weight=...)`). Pure functions, no I/O.

Shapes: [B, T] token tensors, `mask` 1 on response tokens.
"""

from __future__ import annotations

import torch


def logprob_mismatch(rollout_logp: torch.Tensor, learner_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """Mean and max |learner - rollout| over masked tokens, plus the mean signed gap and the importance ratio's
    mean (1.0 when the two agree). Returns detached scalar tensors; all zeros when the mask is empty."""
    m = mask.to(torch.bool)
    diff = (learner_logp.detach() - rollout_logp.detach()).float()[m]
    if diff.numel() == 0:
        z = torch.zeros((), device=rollout_logp.device)
        return {"logp_diff_mean": z, "logp_diff_max": z, "logp_diff_signed": z, "rollout_ratio_mean": z + 1}
    return {"logp_diff_mean": diff.abs().mean(), "logp_diff_max": diff.abs().max(),
            "logp_diff_signed": diff.mean(), "rollout_ratio_mean": diff.exp().mean()}


def tis_weight(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """min(exp(old - rollout), cap) per token, no gradient: [B, T] -> [B, T]. cap <= 0 disables it (all ones).

    The exponent is clamped before exp so a token the engine found very unlikely cannot overflow."""
    if cap <= 0:
        return torch.ones_like(old_logp)
    log_ratio = (old_logp.detach() - rollout_logp.detach()).clamp(max=torch.log(torch.tensor(cap)).item())
    return log_ratio.exp().clamp(max=cap)


def stale_token_gap(old_logp: list, behaviour_logp: list, token_behind: list) -> dict:
    """Asynchronous RL: mean |pi_old - pi_behaviour| over the response tokens the learner's current weights made
    (0 syncs behind) and over those older weights made, per token (a partial rollout mixes both in one sequence).
    Without partial rollouts the first is the engine/learner numerical gap and the second adds how far the policy
    moved since (a continued partial rollout's fresh tokens also saw the old weights' KV cache). Lists of [len]
    tensors/lists, one per response; a group with no tokens is left out."""
    fresh, stale = [], []
    for old, beh, behind in zip(old_logp, behaviour_logp, token_behind):
        gap = (torch.as_tensor(old, dtype=torch.float64) - torch.as_tensor(beh, dtype=torch.float64)).abs()
        b = torch.as_tensor(behind)[:gap.shape[0]]
        fresh.append(gap[b == 0])
        stale.append(gap[b > 0])
    out = {}
    for name, parts in (("fresh", fresh), ("stale", stale)):
        cat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        if cat.numel():
            out[f"logp_gap_{name}"] = float(cat.mean())
    out["mixed_version_samples"] = mixed_version_share(token_behind)
    return out


def mixed_version_share(token_behind: list) -> float:
    """The share of responses whose tokens came from more than one weight version (a partial rollout continued
    across an update); `token_behind` per response, per token: syncs behind."""
    mixed = sum(len(set(torch.as_tensor(b).tolist())) > 1 for b in token_behind)
    return mixed / max(1, len(token_behind))
