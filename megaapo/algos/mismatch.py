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
