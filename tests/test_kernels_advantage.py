"""Tests of kernels/group_advantage.py: advantages and APO shaping against megaapo.algos (advantages, apo) and
the PyTorch reference, arbitrary group ids, and a single launch. How they run (a TRITON_INTERPRET=1 child pytest
without CUDA, directly on a GPU with it) and the shared helpers: tests/kernel_harness.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # kernel_harness is found under any --import-mode

from kernel_harness import DEV, Launches, close, device_ops, kernel_test  # noqa: E402
from kernel_harness import _record_name, poison  # noqa: E402,F401  (autouse fixtures)


# ----------------------------------------------------------------------------------------- group_advantage
def rewards_batch(seed=0, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    sizes = [8, 8, 1, 5, 8, 3, 8, 2]                  # variable sizes, a singleton, equal-reward groups below
    gid = torch.cat([torch.full((k,), i) for i, k in enumerate(sizes)])
    r = torch.randint(0, 3, (len(gid),), generator=g).double() * 0.5 + 0.5 * (torch.rand(len(gid), generator=g)
                                                                              > 0.5).double()
    r[gid == 1] = 1.5
    r[gid == 6] = 0.0
    correct = r >= 1
    lengths = torch.randint(5, 5000, (len(gid),), generator=g)
    perm = torch.randperm(len(gid), generator=g)      # groups interleaved, not contiguous
    gid, r, correct, lengths = gid[perm], r[perm].float(), correct[perm], lengths[perm]
    return gid.to(DEV), r.to(DEV), correct.to(DEV), lengths.to(DEV)


@kernel_test
@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("faithful_to", ["paper", "code"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_group_advantage_matches_megaapo(estimator, faithful_to, unbiased):
    from megaapo.algos.advantages import compute_advantages
    from megaapo.algos.apo import apo_shaping
    from kernels.group_advantage import group_advantage
    gid, r, correct, lengths = rewards_batch(seed=3)
    eps = 1e-4 if estimator == "grpo" else 0.0
    out = group_advantage(r, gid, estimator=estimator, eps=eps, unbiased=unbiased, correct=correct,
                          lengths=lengths, stcr_base=1.0005, faithful_to=faithful_to, block_out=8, block_in=16)
    adv = compute_advantages(estimator, r, gid, eps, unbiased)
    sh = apo_shaping(correct, lengths, adv, gid, stcr_base=1.0005, faithful_to=faithful_to)
    close(out.advantages, adv, 1e-6, "advantages")
    close(out.kl_weight, sh.kl_weight, 1e-6, "kl_weight")
    close(out.adv_multiplier, sh.adv_multiplier, 1e-6, "adv_multiplier")
    close(out.difficulty, sh.difficulty, 1e-6, "difficulty")
    assert torch.equal(out.positive.cpu(), sh.positive.cpu())
    assert (out.advantages[(gid == 1) | (gid == 6) | (gid == 2)] == 0).all(), "equal rewards / singleton -> 0"


@kernel_test
def test_group_advantage_arbitrary_ids_and_no_apo():
    from kernels.group_advantage import group_advantage, group_advantage_reference
    gid, r, correct, lengths = rewards_batch(seed=4)
    out = group_advantage(r, gid * 7919 + 3, eps=1e-9)           # sparse, non-contiguous ids
    assert out.kl_weight is None and out.positive is None
    close(out.advantages, group_advantage_reference(r, gid, eps=1e-9).advantages, 1e-6, "advantages")
    one = group_advantage(r[:1], gid[:1], estimator="rloo", correct=correct[:1], lengths=lengths[:1])
    assert one.advantages.item() == 0.0 and one.adv_multiplier.item() == 1.0


@kernel_test
def test_group_advantage_is_one_launch(monkeypatch):
    """One launch and no other device work (no zero-fill, no copy of the bool `correct`), with DADS + STCR."""
    import kernels.group_advantage as ga
    launches = Launches(monkeypatch, ga, "_group_adv_kernel")
    monkeypatch.setattr(ga, "torch", torch)   # unpoisoned: the NaN fills of the `poison` fixture are device work
    gid, r, correct, lengths = rewards_batch(seed=5)
    with device_ops() as rec:
        out = ga.group_advantage(r, gid, correct=correct, lengths=lengths, block_out=8, block_in=16)
    assert launches.log == ["_group_adv_kernel"]
    assert rec.work == [], f"device work besides the kernel: {rec.work}"
    assert out.positive.dtype == torch.bool
