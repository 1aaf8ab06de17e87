"""Group-relative advantages over variable-size groups (GRPO, Dr.GRPO, RLOO) with APO's DADS KL weights and STCR
advantage multipliers, in one launch.

Called by the training loop after rewards are scored, in place of `megaapo.algos.advantages.compute_advantages`
followed by `megaapo.algos.apo.apo_shaping` (same numbers; tested against both). Public API: `group_advantage`
and `group_advantage_reference`.

What is fused. Each program owns a block of responses and scans all B responses in tiles, comparing group ids
pairwise: pass 1 gives its responses' group count, reward sum, number correct and summed correct length; pass 2
the sum of squared deviations from the group mean (two-pass, like the reference, so equal rewards give exactly
std 0). Statistics are float64 as in `megaapo.algos.advantages`. Group ids may be any integers (no
`max(group_index)` host sync, no [num_groups] scratch, no zero-fill); the cost is B^2 compares, which is ~1M for
1024 responses (microseconds) and still small at 8k. Memory traffic: B rewards/ids read B/BLOCK_O times (L2
resident), five [B] outputs written once.

Fallback: on CPU tensors without TRITON_INTERPRET=1 `group_advantage` runs `group_advantage_reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels._common import next_pow2, on_gpu, use_triton

ESTIMATORS = {"grpo": 0, "drgrpo": 1, "rloo": 2}


@dataclass
class GroupAdvantage:
    """Per-response outputs, all [B]: advantages float32 (before STCR); with `correct` given, also the DADS KL
    weight, the STCR multiplier (float32), the group difficulty d = 1 - accuracy (float32) and `positive` (bool)."""
    advantages: torch.Tensor
    kl_weight: Optional[torch.Tensor] = None
    adv_multiplier: Optional[torch.Tensor] = None
    difficulty: Optional[torch.Tensor] = None
    positive: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------------------------------------- kernel
# Compiled per rewards dtype (fp32 / fp64) and HAS_APO only: the estimator and the APO switches are runtime scalars,
# n is not specialised, nor is pointer alignment (see kernels.compile_check).
@triton.jit(do_not_specialize=["n", "est", "unbiased", "dads", "stcr", "code"],
            do_not_specialize_on_alignment=["r_ptr", "g_ptr", "c_ptr", "len_ptr", "adv_ptr", "klw_ptr", "mult_ptr",
                                            "diff_ptr", "pos_ptr"])
def _group_adv_kernel(r_ptr, g_ptr, c_ptr, len_ptr, adv_ptr, klw_ptr, mult_ptr, diff_ptr, pos_ptr, n, eps, ln_base,
                      est, unbiased, dads, stcr, code,
                      HAS_APO: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    i = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    im = i < n
    gi = tl.load(g_ptr + i, mask=im, other=-1).to(tl.int64)
    ri = tl.load(r_ptr + i, mask=im, other=0.0).to(tl.float64)
    cnt = tl.zeros((BLOCK_O,), tl.float64)
    s1 = tl.zeros((BLOCK_O,), tl.float64)
    nc = tl.zeros((BLOCK_O,), tl.float64)
    lc = tl.zeros((BLOCK_O,), tl.float64)
    for j0 in range(0, n, BLOCK_I):
        j = j0 + tl.arange(0, BLOCK_I)
        jm = j < n
        gj = tl.load(g_ptr + j, mask=jm, other=-1).to(tl.int64)
        same = (gi[:, None] == gj[None, :]) & jm[None, :]
        rj = tl.load(r_ptr + j, mask=jm, other=0.0).to(tl.float64)
        cnt += tl.sum(tl.where(same, 1.0, 0.0).to(tl.float64), axis=1)
        s1 += tl.sum(tl.where(same, rj[None, :], 0.0), axis=1)
        if HAS_APO:
            cj = (tl.load(c_ptr + j, mask=jm, other=0) != 0).to(tl.float64)
            lj = tl.load(len_ptr + j, mask=jm, other=0).to(tl.float64)
            nc += tl.sum(tl.where(same, cj[None, :], 0.0), axis=1)
            lc += tl.sum(tl.where(same, (cj * lj)[None, :], 0.0), axis=1)
    mean = s1 / tl.maximum(cnt, 1.0)
    sq = tl.zeros((BLOCK_O,), tl.float64)
    for j0 in range(0, n, BLOCK_I):
        j = j0 + tl.arange(0, BLOCK_I)
        jm = j < n
        gj = tl.load(g_ptr + j, mask=jm, other=-1).to(tl.int64)
        same = (gi[:, None] == gj[None, :]) & jm[None, :]
        rj = tl.load(r_ptr + j, mask=jm, other=0.0).to(tl.float64)
        dev = rj[None, :] - mean[:, None]
        sq += tl.sum(tl.where(same, dev * dev, 0.0), axis=1)
    den = tl.where(unbiased != 0, tl.maximum(cnt - 1.0, 1.0), tl.maximum(cnt, 1.0))
    std = tl.sqrt(sq / den)
    centred = ri - mean
    # est: ESTIMATORS value. grpo: a group with equal rewards gets exactly 0 even with eps = 0; rloo: leave-one-out
    adv = tl.where(est == 0, tl.where(std > 0, centred / (std + eps), 0.0),
                   tl.where(est == 1, centred, tl.where(cnt > 1, centred * cnt / tl.maximum(cnt - 1.0, 1.0), 0.0)))
    adv32 = adv.to(tl.float32)
    tl.store(adv_ptr + i, adv32, mask=im)
    if HAS_APO:
        craw = tl.load(c_ptr + i, mask=im, other=0)
        ci = craw != 0
        wrong = craw == 0
        acc = nc / tl.maximum(cnt, 1.0)
        d = (1.0 - acc).to(tl.float32)
        tl.store(diff_ptr + i, d, mask=im)
        # code: the authors' code, where "positive" is the sign of the advantage, not correctness
        positive = tl.where(code != 0, adv32 > 0, ci)
        tl.store(pos_ptr + i, positive.to(tl.int8), mask=im)
        f = tl.where((d > 0) & (d < 1), 1.0 - tl.exp(-2.718281828459045 * (1.0 - d)), 1.0)
        klw = tl.where(positive & (dads != 0), f, 1.0)
        tl.store(klw_ptr + i, klw, mask=im)
        n_correct = acc * cnt
        li = tl.load(len_ptr + i, mask=im, other=0).to(tl.float64)
        delta = (li - lc / tl.maximum(n_correct, 1.0)).to(tl.float32)
        eligible = wrong & (n_correct > 0) & ((code != 0) | (adv32 < 0)) & (stcr != 0)
        m = tl.where(delta > 0, 2.0 - tl.exp(-delta * ln_base), 1.0)
        tl.store(mult_ptr + i, tl.where(eligible, m, 1.0), mask=im)


# --------------------------------------------------------------------------------------------------- launcher
def _launch(rewards, group_index, correct, lengths, est, eps, unbiased, dads, stcr, stcr_base, code,
            block_out: Optional[int], block_in: Optional[int]):
    n = rewards.numel()
    dev = rewards.device
    out = torch.empty(n, dtype=torch.float32, device=dev)
    has_apo = correct is not None
    if has_apo:
        klw, mult, diff = (torch.empty(n, dtype=torch.float32, device=dev) for _ in range(3))
        pos = torch.empty(n, dtype=torch.int8, device=dev)
    else:
        klw = mult = diff = pos = out
    if on_gpu(dev):
        # All 255 registers: the [32, 128] fp64 tiles need ~240, and left to itself ptxas aims lower and spills a few
        # bytes in some variants (kernels.compile_check). One launch of B/32 programs: occupancy does not matter.
        bo, bi, opts = block_out or 32, block_in or 128, dict(num_warps=4, maxnreg=255)
    else:
        bo, bi, opts = block_out or min(64, next_pow2(n)), block_in or min(256, next_pow2(n)), dict(num_warps=1)
    if n:
        _group_adv_kernel[(triton.cdiv(n, bo),)](
            rewards, group_index, correct if has_apo else rewards, lengths if has_apo else rewards,
            out, klw, mult, diff, pos, n, float(eps), math.log(stcr_base),
            int(est), int(unbiased), int(dads), int(stcr), int(code),
            HAS_APO=has_apo, BLOCK_O=bo, BLOCK_I=bi, **opts)
    if not has_apo:
        return (out,)
    return out, klw, mult, diff, pos.view(torch.bool)


class _GroupAdvantage(torch.autograd.Function):
    """Advantages are constants of the loss: the outputs are non-differentiable (backward is never reached)."""

    @staticmethod
    def forward(ctx, rewards, group_index, correct, lengths, *args):
        outs = _launch(rewards, group_index, correct, lengths, *args)
        ctx.mark_non_differentiable(*outs)
        return outs if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("group_advantage has no gradient")


def _check(estimator, faithful_to, correct, lengths, rewards, group_index):
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {sorted(ESTIMATORS)}")
    if faithful_to not in ("paper", "code"):
        raise ValueError(f"faithful_to must be 'paper' or 'code', got {faithful_to!r}")
    if (correct is None) != (lengths is None):
        raise ValueError("group_advantage: DADS/STCR need both `correct` and `lengths` (or neither)")
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError("group_advantage: rewards and group_index must both be [B]")


def group_advantage(rewards: torch.Tensor, group_index: torch.Tensor, *, estimator: str = "grpo", eps: float = 1e-6,
                    unbiased: bool = True, correct: Optional[torch.Tensor] = None,
                    lengths: Optional[torch.Tensor] = None, dads: bool = True, stcr: bool = True,
                    stcr_base: float = 1.00001, faithful_to: str = "paper", block_out: Optional[int] = None,
                    block_in: Optional[int] = None) -> GroupAdvantage:
    """rewards [B] float, group_index [B] int (any ids; equal id = same group) -> GroupAdvantage.

    estimator: grpo ((r - mean) / (std + eps), 0 for equal rewards), drgrpo (r - mean), rloo (leave-one-out).
    correct [B] bool and lengths [B] int (response tokens) switch on APO: DADS weights and STCR multipliers, with
    `faithful_to` as in `megaapo.algos.apo.apo_shaping` (positivity / STCR sign tests use these advantages).
    CPU tensors without TRITON_INTERPRET=1 run `group_advantage_reference`.
    """
    _check(estimator, faithful_to, correct, lengths, rewards, group_index)
    if not use_triton(rewards):
        return group_advantage_reference(rewards, group_index, estimator=estimator, eps=eps, unbiased=unbiased,
                                         correct=correct, lengths=lengths, dads=dads, stcr=stcr,
                                         stcr_base=stcr_base, faithful_to=faithful_to)
    # the kernels' dtypes (no copy when the inputs already have them): fp32 or fp64 rewards, int64 ids and
    # lengths, correct as int8 (a bool tensor is viewed, not copied)
    r = rewards.contiguous() if rewards.dtype in (torch.float32, torch.float64) else rewards.contiguous().double()
    c = None if correct is None else (correct if correct.dtype == torch.bool else correct != 0).contiguous().view(
        torch.int8)
    outs = _GroupAdvantage.apply(r, group_index.contiguous().long(), c,
                                 None if lengths is None else lengths.contiguous().long(), ESTIMATORS[estimator], eps,
                                 unbiased, dads, stcr, stcr_base, faithful_to == "code", block_out, block_in)
    return GroupAdvantage(*outs) if isinstance(outs, tuple) else GroupAdvantage(outs)


def group_advantage_reference(rewards, group_index, *, estimator: str = "grpo", eps: float = 1e-6,
                              unbiased: bool = True, correct=None, lengths=None, dads: bool = True,
                              stcr: bool = True, stcr_base: float = 1.00001,
                              faithful_to: str = "paper") -> GroupAdvantage:
    """Pure-PyTorch `group_advantage` (same arguments and outputs); float64 statistics via index_add."""
    _check(estimator, faithful_to, correct, lengths, rewards, group_index)
    _, gid = torch.unique(group_index, return_inverse=True)
    n_groups = int(gid.max()) + 1 if gid.numel() else 0
    r = rewards.double()
    seg = lambda v: torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, gid, v)  # noqa: E731
    cnt = seg(torch.ones_like(r))
    mean = seg(r) / cnt.clamp(min=1)
    sq = seg((r - mean[gid]) ** 2)
    std = (sq / ((cnt - 1).clamp(min=1) if unbiased else cnt.clamp(min=1))).sqrt()[gid]
    centred, n = r - mean[gid], cnt[gid]
    if estimator == "grpo":
        adv = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    elif estimator == "drgrpo":
        adv = centred
    else:
        adv = torch.where(n > 1, centred * n / (n - 1).clamp(min=1), torch.zeros_like(centred))
    adv = adv.float()
    if correct is None:
        return GroupAdvantage(adv)
    c = correct.bool()
    acc = seg(c.double()) / cnt.clamp(min=1)
    d = (1.0 - acc)[gid].float()
    positive = c if faithful_to == "paper" else adv > 0
    ones = torch.ones_like(adv)
    dd = d.double()
    f = torch.where((dd > 0) & (dd < 1), 1.0 - torch.exp(-math.e * (1.0 - dd)), torch.ones_like(dd)).float()
    klw = torch.where(positive, f, ones) if dads else ones
    mult = ones
    if stcr:
        n_correct = (acc * cnt)[gid]
        mean_len = (seg(torch.where(c, lengths.double(), 0.0)) / (acc * cnt).clamp(min=1))[gid]
        delta = lengths.double() - mean_len
        eligible = (~c) & (n_correct > 0)
        if faithful_to == "paper":
            eligible &= adv < 0
        m = torch.where(delta > 0, 2.0 - stcr_base ** (-delta), torch.ones_like(delta)).float()
        mult = torch.where(eligible, m, ones)
    return GroupAdvantage(adv, klw, mult, d, positive)
