"""The RL math pinned to hand-computed values (shared ALGORITHMS.md): advantages, APO, DAPO, losses, KL."""

import math

import pytest
import torch

from megaapo.algos import (ADVANTAGES, LossSettings, aggregate, apo_shaping, compute_advantages, dads_weight,
                           dynamic_sampling_keep, overlong_penalty, policy_loss, stcr_multiplier, stepgrpo_objective)
from megaapo.algos.dapo import regroup
from megaapo.algos.losses import KL_ESTIMATORS, ppo_clip_loss


# ------------------------------------------------------------------------------------------------ DADS / STCR
@pytest.mark.parametrize("k,expected", [(1, 0.288), (2, 0.493), (3, 0.639), (4, 0.743), (5, 0.817), (6, 0.870),
                                        (7, 0.907)])
def test_dads_table_for_g8(k, expected):
    d = torch.tensor(1 - k / 8)
    assert dads_weight(d).item() == pytest.approx(expected, abs=5e-4)


def test_dads_endpoints_are_one():
    assert dads_weight(torch.tensor([0.0, 1.0])).tolist() == [1.0, 1.0]
    # just inside the interval the formula applies: f(1 - 1e-6) is ~e*1e-6, far from 1
    assert dads_weight(torch.tensor(1 - 1e-6)).item() < 1e-5


def test_stcr_multiplier_values():
    m = stcr_multiplier(torch.tensor([1000.0, 4096.0, 0.0, -50.0]), base=1.00001)
    assert m[0].item() == pytest.approx(2 - 1.00001 ** -1000, rel=1e-6)
    assert m[0].item() == pytest.approx(1.01, abs=5e-4)
    assert m[1].item() == pytest.approx(1.04, abs=5e-4)
    assert m[2:].tolist() == [1.0, 1.0]
    assert stcr_multiplier(torch.tensor(15.0), base=1.1).item() == pytest.approx(2 - 1.1 ** -15, rel=1e-6)


def _group(rewards, correct, lengths, group=None):
    r = torch.tensor(rewards)
    idx = torch.tensor(group) if group is not None else torch.zeros(len(rewards), dtype=torch.long)
    return r, torch.tensor(correct, dtype=torch.bool), torch.tensor(lengths, dtype=torch.float32), idx


def test_apo_shaping_hand_table():
    # group 0: two correct (lengths 10, 20 -> Lpos 15), a long wrong one (30) and a short wrong one (12)
    # group 1: nothing correct -> no DADS, no STCR
    r, correct, lengths, idx = _group([1.5, 1.0, 0.5, 0.0, 0.5, 0.0], [1, 1, 0, 0, 0, 0], [10, 20, 30, 12, 99, 5],
                                      [0, 0, 0, 0, 1, 1])
    adv = compute_advantages("grpo", r, idx, eps=1e-9)
    s = apo_shaping(correct, lengths, adv, idx, stcr_base=1.1)
    f = 1 - math.exp(-math.e * 0.5)  # d = 1 - 2/4
    assert s.kl_weight.tolist() == pytest.approx([f, f, 1, 1, 1, 1], abs=1e-6)
    assert s.adv_multiplier.tolist() == pytest.approx([1, 1, 2 - 1.1 ** -15, 1, 1, 1], abs=1e-6)
    assert s.difficulty.tolist() == pytest.approx([0.5] * 4 + [1.0] * 2)


def test_apo_faithful_to_code_differs_only_on_positive_advantage_negatives():
    # a wrong but well-formatted answer (0.5) in a group of zeros gets A > 0
    r, correct, lengths, idx = _group([1.5, 0.5, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0], [4, 40] + [4] * 6)
    adv = compute_advantages("grpo", r, idx, eps=1e-9)
    assert adv[1] > 0
    paper = apo_shaping(correct, lengths, adv, idx, stcr_base=1.1, faithful_to="paper")
    code = apo_shaping(correct, lengths, adv, idx, stcr_base=1.1, faithful_to="code")
    assert paper.kl_weight[1].item() == 1.0 and code.kl_weight[1].item() < 1.0    # DADS by sign of A in code
    assert paper.adv_multiplier[1].item() == 1.0 and code.adv_multiplier[1].item() > 1.0  # STCR only A<0 in paper
    assert paper.kl_weight[0] == code.kl_weight[0]


def test_apo_faithful_to_code_on_a_correct_unformatted_answer_with_negative_advantage():
    """The second case where sign and correctness disagree (shared ALGORITHMS.md): a correct but unformatted answer
    (r = 1.0) in a group of mostly 1.5 gets A < 0. Paper: a positive, DADS weight f(d) at d = 1 - 7/8; code: not a
    positive (A <= 0), weight 1. STCR leaves it alone in both (it is correct). Values as in docs/rewards.md."""
    r, correct, lengths, idx = _group([1.0, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 0.0], [1, 1, 1, 1, 1, 1, 1, 0],
                                      [200] * 7 + [1200])
    adv = compute_advantages("grpo", r, idx, eps=1e-9)
    assert adv[0] < 0
    paper = apo_shaping(correct, lengths, adv, idx, faithful_to="paper")
    code = apo_shaping(correct, lengths, adv, idx, faithful_to="code")
    f = 1 - math.exp(-math.e * 7 / 8)   # 1 - d = 7/8
    assert f == pytest.approx(0.907, abs=5e-4)
    assert paper.kl_weight[0].item() == pytest.approx(f, abs=1e-6) and code.kl_weight[0].item() == 1.0
    assert paper.kl_weight[1:7].tolist() == code.kl_weight[1:7].tolist() == pytest.approx([f] * 6, abs=1e-6)
    assert paper.adv_multiplier[0].item() == code.adv_multiplier[0].item() == 1.0
    # the wrong, 1000-tokens-longer response has A < 0: amplified in both modes, x(2 - 1.00001**-1000) = x1.00995
    assert paper.adv_multiplier[7].item() == code.adv_multiplier[7].item() == pytest.approx(1.00995, abs=1e-5)


def test_apo_docs_row_for_a_wrong_formatted_answer_with_positive_advantage():
    """docs/rewards.md's numbers for the first case: r = 0.5 among 1.5 and six 0s, 1000 tokens longer than the
    correct answer: paper KL weight 1 and no STCR; code KL weight f(1 - 1/8) = 0.288 and STCR x1.00995."""
    r, correct, lengths, idx = _group([1.5, 0.5, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0],
                                      [200, 1200] + [200] * 6)
    adv = compute_advantages("grpo", r, idx, eps=1e-9)
    paper = apo_shaping(correct, lengths, adv, idx, faithful_to="paper")
    code = apo_shaping(correct, lengths, adv, idx, faithful_to="code")
    assert (paper.kl_weight[1].item(), paper.adv_multiplier[1].item()) == (1.0, 1.0)
    assert code.kl_weight[1].item() == pytest.approx(0.288, abs=5e-4)
    assert code.adv_multiplier[1].item() == pytest.approx(1.00995, abs=1e-5)


def test_stcr_is_one_for_positives_and_no_correct_groups():
    r, correct, lengths, idx = _group([1.0, 0.0, 0.0, 0.0], [1, 0, 0, 0], [100, 200, 50, 300])
    adv = compute_advantages("grpo", r, idx, eps=1e-9)
    s = apo_shaping(correct, lengths, adv, idx, stcr_base=1.01)
    assert s.adv_multiplier[0].item() == 1.0 and s.adv_multiplier[2].item() == 1.0    # positive; shorter negative
    assert s.adv_multiplier[1].item() > 1 and s.adv_multiplier[3].item() > s.adv_multiplier[1].item()
    none = apo_shaping(torch.zeros(4, dtype=torch.bool), lengths, torch.full((4,), -1.0), idx, stcr_base=1.5)
    assert none.adv_multiplier.tolist() == [1.0] * 4


def test_apo_reward_values():
    from megaapo.rewards import RewardInput
    from megaapo.rewards.pool import RewardScorer

    responses = ["<think>two plus one</think> <answer>3</answer>", "<answer>3</answer>",
                 "<think>hmm</think><answer>4</answer>", "four"]
    scorer = RewardScorer({"accuracy": 1.0, "format": 0.5}, num_workers=0)
    assert scorer.score([RewardInput(x, "3") for x in responses]).total == [1.5, 1.0, 0.5, 0.0]


# ------------------------------------------------------------------------------------------------ advantages
def test_grpo_hand_computed_group():
    r = torch.tensor([1.5, 0.5, 0.0, 1.0])
    idx = torch.zeros(4, dtype=torch.long)
    std = math.sqrt(1.25 / 3)  # unbiased: squared deviations 0.5625+0.0625+0.5625+0.0625 over G-1
    expected = [0.75 / std, -0.25 / std, -0.75 / std, 0.25 / std]
    assert compute_advantages("grpo", r, idx, eps=0.0).tolist() == pytest.approx(expected, rel=1e-6)
    eps = 1e-4
    expected_eps = [0.75 / (std + eps), -0.25 / (std + eps), -0.75 / (std + eps), 0.25 / (std + eps)]
    assert compute_advantages("grpo", r, idx, eps=eps).tolist() == pytest.approx(expected_eps, rel=1e-6)
    biased = math.sqrt(1.25 / 4)
    assert compute_advantages("grpo", r, idx, eps=0.0, unbiased=False)[0].item() == pytest.approx(0.75 / biased)


def test_zero_variance_group_gets_zero_advantage():
    r = torch.tensor([1.0, 1.0, 1.0, 0.3, 0.7])
    idx = torch.tensor([0, 0, 0, 1, 1])
    for name in ADVANTAGES:
        if name.startswith("reinforce"):
            continue
        adv = compute_advantages(name, r, idx, eps=0.0)
        assert adv[:3].tolist() == [0.0, 0.0, 0.0], name
        assert not torch.isnan(adv).any(), name


def test_variable_size_groups_and_other_estimators():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    idx = torch.tensor([1, 1, 0, 0, 0, 2])  # sizes 3, 2, 1 and not sorted
    dr = compute_advantages("drgrpo", r, idx, eps=0.0)
    assert dr.tolist() == pytest.approx([0.5, -0.5, 2 / 3, -1 / 3, -1 / 3, 0.0], abs=1e-6)
    rloo = compute_advantages("rloo", r, idx, eps=0.0)
    assert rloo.tolist() == pytest.approx([1.0, -1.0, 1.0, -0.5, -0.5, 0.0], abs=1e-6)  # r_i - mean(others)
    rpp = compute_advantages("reinforce_pp", r, idx, eps=0.0)
    assert rpp.mean().item() == pytest.approx(0.0, abs=1e-6) and rpp.std().item() == pytest.approx(1.0, abs=1e-6)
    grpo = compute_advantages("grpo", r, idx, eps=0.0)
    assert grpo[5].item() == 0.0  # a lone response has no baseline to beat


def test_dapo_filter_and_overlong():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    idx = torch.tensor([0, 0, 1, 1, 2, 2])
    keep = dynamic_sampling_keep(r, idx)
    assert keep.tolist() == [False, False, True, True, False, False]
    assert regroup(idx[keep]).tolist() == [0, 0]
    pen = overlong_penalty(torch.tensor([100, 768, 896, 1024, 2000]), max_len=1024, buffer=256, penalty=1.0)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])


# ---------------------------------------------------------------------------------------------- losses and KL
def test_ppo_clip_at_both_bounds():
    logp_old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clipped = ppo_clip_loss(logp, logp_old, adv, eps_low=0.2, eps_high=0.2)
    assert loss.tolist()[0] == pytest.approx([-1.2, 0.8, -0.5, 1.5])
    assert clipped.tolist()[0] == [True, True, False, False]
    loss.sum().backward()
    # clipped tokens carry no gradient; unclipped ones -A*rho
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 0.0, -0.5, 1.5])
    hi, _ = ppo_clip_loss(torch.log(torch.tensor([[1.5]])), torch.zeros(1, 1), torch.tensor([[1.0]]), 0.2, 0.28)
    assert hi.item() == pytest.approx(-1.28)


def test_kl_estimators_on_known_values():
    logp, ref = torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))
    assert KL_ESTIMATORS["k1"](logp, ref).item() == pytest.approx(math.log(2))
    assert KL_ESTIMATORS["k2"](logp, ref).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert KL_ESTIMATORS["k3"](logp, ref).item() == pytest.approx(0.5 + math.log(0.5) * -1 - 1)
    assert KL_ESTIMATORS["k3"](logp, logp).item() == 0.0


def test_aggregation_modes():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate("token_mean", v, m).item() == pytest.approx(10 / 4)
    assert aggregate("seq_mean_token_mean", v, m).item() == pytest.approx((2 + 4) / 2)
    assert aggregate("seq_sum_norm", v, m, norm_len=8).item() == pytest.approx(10 / (2 * 8))
    # explicit global normalisers: two half-batches sum to the whole-batch value
    halves = sum(aggregate("token_mean", v[i:i + 1], m[i:i + 1], num_tokens=4).item() for i in range(2))
    assert halves == pytest.approx(10 / 4)


def test_policy_loss_with_dads_weighted_kl():
    torch.manual_seed(0)
    B, T = 3, 5
    logp = torch.randn(B, T) * 0.1 - 1
    logp_ref = logp + torch.randn(B, T) * 0.1
    mask = torch.ones(B, T)
    mask[2, 3:] = 0
    adv = torch.tensor([1.0, -0.5, 0.2])
    lam = torch.tensor([0.3, 1.0, 0.7])
    s = LossSettings(kl_coef=1e-3, loss_agg="token_mean", kl_agg="seq_mean_token_mean")
    loss, metrics = policy_loss(logp, logp.detach(), adv, mask, s, logp_ref=logp_ref, kl_weight=lam)
    k3 = torch.exp(logp_ref - logp) - (logp_ref - logp) - 1
    per_seq_kl = (k3 * mask).sum(1) / mask.sum(1)
    pg = (-(adv[:, None]) * mask).sum() / mask.sum()
    expected = pg + 1e-3 * (lam * per_seq_kl).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["clip_frac"].item() == 0.0


def test_stepgrpo_objective_matches_composed_loss():
    torch.manual_seed(1)
    B, T = 4, 6
    logp = (torch.randn(B, T) * 0.2 - 1).requires_grad_(True)
    logp_ref = logp.detach() + torch.randn(B, T) * 0.05
    mask = (torch.rand(B, T) > 0.2).float()
    mask[:, 0] = 1
    adv = torch.randn(B)
    direct = stepgrpo_objective(logp, logp_ref, adv, mask, beta=0.04)
    s = LossSettings(policy_loss="vanilla", loss_agg="seq_mean_token_mean", kl_coef=0.04, kl_estimator="k3",
                     kl_agg="seq_mean_token_mean")
    composed, _ = policy_loss(logp, logp.detach(), adv, mask, s, logp_ref=logp_ref)
    assert composed.item() == pytest.approx(direct.item(), rel=1e-6)
    g1, = torch.autograd.grad(direct, logp)
    g2, = torch.autograd.grad(composed, logp)
    assert torch.allclose(g1, g2, atol=1e-7)


# ------------------------------------------------------------------------------------- the kernel's duplicates
def test_kernel_loss_settings_mirror_megaapo():
    """kernels/ imports nothing from megaapo, so kernels.policy_loss keeps its own LossSettings: same fields, types,
    defaults and order as megaapo's, or the two drift apart."""
    import dataclasses

    from kernels.policy_loss import LossSettings as KernelSettings
    spec = lambda cls: [(f.name, str(f.type), f.default) for f in dataclasses.fields(cls)]  # noqa: E731
    assert spec(KernelSettings) == spec(LossSettings)


def test_policy_loss_kernel_dispatch_rules(monkeypatch):
    """Which batches `policy_loss` hands to the Triton kernel (the kernel path itself: tests/test_kernels_policy_loss.py)."""
    from megaapo.algos.losses import _use_kernel
    B, T = 3, 4
    lp, mask, adv = torch.zeros(B, T), torch.ones(B, T, dtype=torch.bool), torch.zeros(B)
    s = LossSettings(kl_coef=0.1)

    def uses(logp=lp, old=lp, a=adv, ref=lp, w=torch.ones(B), tis=None, ent=None, settings=s):
        return _use_kernel(logp, (old, a, mask, ref, w, tis), ent, settings)
    monkeypatch.delenv("MEGAAPO_TRITON", raising=False)
    assert not uses(), "CPU tensors take the PyTorch path unless MEGAAPO_TRITON=1"
    monkeypatch.setenv("MEGAAPO_TRITON", "1")
    assert uses() and uses(a=torch.zeros(B, T), tis=lp, ent=lp, w=None, ref=None)
    assert not uses(logp=lp.double()), "fp64 log-probs keep their fp64 loss"
    assert not uses(tis=torch.ones(B, 1)), "broadcast token tensors"
    assert not uses(w=torch.ones(B, 1))
    assert not uses(ref=lp.clone().requires_grad_()), "the kernel makes gradients for logp and entropy only"
    assert not uses(settings=LossSettings(policy_loss="something_registered_later"))
    monkeypatch.setenv("MEGAAPO_TRITON", "0")
    assert not uses()
