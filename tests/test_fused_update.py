"""The learner's fused RL update (`kernels.fused_policy_loss` inside `Learner.train_step`) against the unfused one
(log-probs, then `megaapo.algos.losses.policy_loss`): same loss metrics, gradients, gradient norm and updated
weights, at TP=1 in-process and at TP=2 on gloo.

How it runs: on a machine without CUDA each test re-runs itself in a child pytest with TRITON_INTERPRET=1 (the
Triton kernels on CPU tensors; see tests/kernel_harness.py for why the variable must not leak into this process),
where MEGAAPO_TRITON=1 selects the fused path and MEGAAPO_TRITON=0 the unfused PyTorch one. With CUDA the TP=1 tests
run directly on the GPU. Tolerances (fp32): loss metrics 1e-5 abs, gradient norm 1e-5 relative, every gradient
1e-5 of the largest gradient, weights after the update 1e-6 abs (see dist_workers.fused_learner for Adam's eps).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers import tests/dist_workers.py by name

from dist_workers import FUSED_CASES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def in_runner(request, cuda_ok: bool = True) -> bool:
    """True where the kernels execute; elsewhere run this very test in a TRITON_INTERPRET=1 child and report it."""
    if INTERPRET or (cuda_ok and torch.cuda.is_available()):
        return True
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "pytest", f"{Path(__file__).relative_to(ROOT)}::{request.node.name}",
                           "-q", "-x", "-n", "0", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"[TRITON_INTERPRET=1 child]\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    return False


def check_same_update(res, kl: bool, entropy: bool, loss_stage: bool = True, min_moved: int = 11):
    """loss_stage: the rank computed the loss (the last pipeline stage) and reports its metrics; min_moved: tensors
    of this rank the update must change (a pipeline stage holds half the layers)."""
    (ref_m, ref_w, ref_g), (got_m, got_w, got_g), start = res["ref"], res["got"], res["start"]
    assert set(got_m) == set(ref_m)
    if loss_stage:
        assert any(k.startswith("mismatch/") for k in got_m)
        assert ("kl" in got_m) == kl and ("entropy" in got_m) == entropy
    for k, v in ref_m.items():
        if k != "grad_norm":
            assert abs(got_m[k] - v) <= 1e-5, (k, got_m[k], v)
    assert abs(got_m["grad_norm"] - ref_m["grad_norm"]) <= 1e-5 * ref_m["grad_norm"]
    assert set(got_g) == set(ref_g)
    scale = max(float(g.abs().max()) for g in ref_g.values())
    for k, g in ref_g.items():
        assert (got_g[k] - g).abs().max() <= 1e-5 * scale, k
    moved = 0
    for k, w in ref_w.items():
        assert (got_w[k] - w).abs().max() <= 1e-6, k
        moved += not torch.equal(w, start[k])
    assert moved >= min_moved   # the update changed the model (lm_head and the layers below it)


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_update_equals_unfused(tiny_model, case, request):
    if not in_runner(request):
        return
    from megaapo.distributed import destroy

    from dist_workers import fused_learner, fused_vs_unfused

    over, _, entropy, packing, budget = FUSED_CASES[case]
    learner = fused_learner(tiny_model, 1, packing, budget)
    try:
        res = fused_vs_unfused(learner, tiny_model, case)
    finally:
        destroy()
    assert res["calls"] >= 1 and (budget > 10**6 or res["calls"] > 1), res["calls"]   # once per micro-batch
    check_same_update(res, over.get("kl_coef", 0) > 0, entropy)


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["kl_tis_entropy", "padded_drgrpo_k2", "on_policy_stepgrpo"])
def test_fused_update_equals_unfused_tp2(tiny_model, case, tmp_path, request):
    """TP=2 on gloo: the kernel reduces the vocab-parallel softmax statistics and the hidden-state gradient over the
    TP group; every rank's shards get the unfused update."""
    if not in_runner(request, cuda_ok=False):
        return
    from megaapo.distributed import spawn

    from dist_workers import fused_update_worker

    over, _, entropy, _, _ = FUSED_CASES[case]
    spawn(fused_update_worker, 2, str(tiny_model), 2, case, str(tmp_path / "res.pt"))
    for rank in range(2):
        res = torch.load(tmp_path / f"res.pt.{rank}")
        assert res["calls"] >= 1
        check_same_update(res, over.get("kl_coef", 0) > 0, entropy)


@pytest.mark.distributed
def test_fused_update_equals_unfused_pp2(tied_model, tmp_path, request):
    """PP=2 with tied embeddings, several micro-batches through the 1F1B schedule: the kernel runs on the last
    stage's copy of the embedding (the output layer), whose gradient is then summed with the first stage's; both
    stages get the unfused update."""
    if not in_runner(request, cuda_ok=False):
        return
    from megaapo.distributed import spawn

    from dist_workers import fused_update_worker

    case = "kl_tis_entropy"
    over, _, entropy, _, _ = FUSED_CASES[case]
    spawn(fused_update_worker, 2, str(tied_model), 1, case, str(tmp_path / "res.pt"), 2)
    for rank in range(2):
        res = torch.load(tmp_path / f"res.pt.{rank}")
        assert res["last_stage"] == (rank == 1)
        assert res["calls"] > 1 if res["last_stage"] else res["calls"] == 0   # once per micro-batch
        check_same_update(res, over.get("kl_coef", 0) > 0, entropy, loss_stage=res["last_stage"], min_moved=5)


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2])
def test_fused_update_into_megatron_main_grad(tied_model, tmp_path, tp, request):
    """With megatron's DDP (optim.impl=megatron) the kernel adds the lm_head gradient straight into the fp32
    main_grad buffer. With tied embeddings the same parameter also gets the embedding lookup's gradient through
    megatron's backward hook: both must arrive, so fused and unfused give the same main_grad and update."""
    if not in_runner(request, cuda_ok=False):
        return
    from megaapo.distributed import spawn

    from dist_workers import fused_update_worker

    case = "kl_tis_entropy"
    over, _, entropy, _, _ = FUSED_CASES[case]
    spawn(fused_update_worker, tp, str(tied_model), tp, case, str(tmp_path / "res.pt"), 1, "megatron")
    for rank in range(tp):
        res = torch.load(tmp_path / f"res.pt.{rank}")
        assert res["calls"] > 1   # once per micro-batch
        check_same_update(res, over.get("kl_coef", 0) > 0, entropy)


def test_rl_loss_declines_the_fused_form_it_cannot_match():
    """TIS without pi_old needs the current log-probs before the pass, and an entropy bonus without entropy has no
    bonus on the unfused path: RLLoss offers no fused form there (the learner then computes log-probs, then the loss).
    The fused form's packed inputs line the tokens up sample after sample."""
    from types import SimpleNamespace

    from megaapo.algos.losses import LossSettings
    from megaapo.train import rl_loss

    lp = [torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-0.5, -0.25])]
    exp = SimpleNamespace(lengths=torch.tensor([3, 2]), keep=torch.tensor([True, False]), rollout_logp=lp,
                          advantages=torch.tensor([1.0, -1.0]), kl_weight=torch.tensor([1.0, 0.5]))
    cpu = torch.device("cpu")
    assert rl_loss(exp, [0, 1], LossSettings(), None, None, 2.0).fused_inputs([0, 1], [3, 2], True, cpu) is None
    bonus = LossSettings(entropy_coef=0.01)
    assert rl_loss(exp, [0, 1], bonus, lp, None, 0.0).fused_inputs([0, 1], [3, 2], False, cpu) is None
    got = rl_loss(exp, [0, 1], LossSettings(), lp, None, 2.0).fused_inputs([1, 0], [2, 3], False, cpu)
    assert torch.equal(got["seq_index"], torch.tensor([0, 0, 1, 1, 1]))
    assert torch.equal(got["logp_old"], torch.cat([lp[1], lp[0]]))
    assert torch.equal(got["mask"], torch.tensor([False, False, True, True, True]))
    assert torch.equal(got["advantages"], torch.tensor([-1.0, 1.0])) and got["num_tokens"] == 3.0
    assert torch.equal(got["tis_weight"], torch.ones(5))
