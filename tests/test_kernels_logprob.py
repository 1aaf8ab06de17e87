"""Tests of kernels/fused_logprob.py against an fp64 PyTorch reference, plus the checks that span every kernel:
sm_90 compilation and PTX ordering without a GPU, the plain-CPU fallback, no imports from megaapo, and
vocab-parallel TP=2 on gloo (fused_logprob and fused_policy_loss). How they run (a TRITON_INTERPRET=1 child
pytest without CUDA, directly on a GPU with it) and the shared helpers: tests/kernel_harness.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the spawned TP workers import this module and kernel_harness by name

from kernel_harness import (  # noqa: E402
    DEV, INTERPRET, MODES, ROOT, SMALL, TOL, close, kernel_test, leaf, make_lm, oracle_logits_dtype, rl_batch,
    settings)
from kernel_harness import _record_name, poison  # noqa: E402,F401  (autouse fixtures)


# ------------------------------------------------------------------------------------------- fused_logprob
@kernel_test
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("n,h,v", [(1, 48, 97), (37, 48, 301)])
@pytest.mark.parametrize("entropy", [True, False], ids=["ent", "noent"])
def test_fused_logprob_forward_and_grads(mode, n, h, v, entropy):
    from kernels.fused_logprob import LaunchConfig, fused_logprob, fused_logprob_reference
    dtype, logits_dtype = MODES[mode]
    hidden, weight, targets = make_lm(n, h, v, dtype, seed=n + v)
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(n, generator=g).to(DEV), torch.randn(n, generator=g).to(DEV)
    x, w = leaf(hidden), leaf(weight)
    lp, ent = fused_logprob(x, w, targets, 0.7, return_entropy=entropy, logits_dtype=logits_dtype,
                            config=LaunchConfig(**SMALL))
    assert (ent is None) == (not entropy)
    assert lp.dtype == torch.float32
    (lp * g_lp + (ent * g_ent if entropy else 0)).sum().backward()
    xr, wr = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    lpr, entr = fused_logprob_reference(xr, wr, targets, 0.7, return_entropy=entropy,
                                        logits_dtype=oracle_logits_dtype(dtype, logits_dtype))
    (lpr * g_lp.double() + (entr * g_ent.double() if entropy else 0)).sum().backward()
    tol = TOL[dtype]
    close(lp, lpr, tol, "logp")
    if entropy:
        close(ent, entr, tol, "entropy")
    close(x.grad, xr.grad, tol, "grad hidden")
    close(w.grad, wr.grad, tol, "grad weight")
    assert x.grad.dtype == dtype and w.grad.dtype == dtype


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_logprob_main_grad_accumulates(dtype):
    from kernels.fused_logprob import LaunchConfig, fused_logprob, fused_logprob_reference
    hidden, weight, targets = make_lm(37, 48, 301, dtype, seed=3)
    start = torch.randn(301, 48, dtype=torch.float32, device=DEV)
    main_grad = start.clone()
    x, w = leaf(hidden), leaf(weight)
    fused_logprob(x, w, targets, main_grad=main_grad, config=LaunchConfig(**SMALL))[0].sum().backward()
    assert w.grad is None, "with main_grad the weight's own .grad must stay empty"
    wr = leaf(weight, torch.float64)
    ref, _ = fused_logprob_reference(hidden.double(), wr, targets, logits_dtype=oracle_logits_dtype(dtype, None))
    ref.sum().backward()
    close(main_grad - start, wr.grad, TOL[dtype], "main_grad increment")


@kernel_test
def test_fused_logprob_default_config_and_negative_logits():
    """Default launch sizes; logits all far below 0 (a max started at 0 instead of -inf gives logp > 0)."""
    from kernels.fused_logprob import fused_logprob, fused_logprob_reference
    hidden, weight, targets = make_lm(37, 48, 301, torch.float32, seed=5)
    hidden = hidden.abs() + 1.0
    weight = -weight.abs() * 3.0 - 1.0
    lp, ent = fused_logprob(hidden, weight, targets, 1.3, return_entropy=True)
    lpr, entr = fused_logprob_reference(hidden.double(), weight.double(), targets, 1.3, return_entropy=True)
    assert (lp <= 0).all()
    close(lp, lpr, 1e-5, "logp")
    close(ent, entr, 1e-5, "entropy")


@kernel_test
def test_fused_logprob_65537_rows():
    """More rows than the 65,535 grid limit of CUDA's y/z axes, in one chunk."""
    from kernels.fused_logprob import LaunchConfig, fused_logprob, fused_logprob_reference
    hidden, weight, targets = make_lm(65_537, 8, 5, torch.float32, seed=7)
    x = leaf(hidden)
    cfg = LaunchConfig(chunk_rows=65_537, block_rows=2048, block_vocab=8)
    lp, _ = fused_logprob(x, weight, targets, config=cfg)
    lp.sum().backward()
    xr = leaf(hidden, torch.float64)
    lpr, _ = fused_logprob_reference(xr, weight.double(), targets)
    lpr.sum().backward()
    close(lp, lpr, 1e-5, "logp")
    close(x.grad, xr.grad, 1e-5, "grad hidden")


# -------------------------------------------------------------------------------------------- every kernel
def test_kernels_import_nothing_from_megaapo():
    import re
    for path in (ROOT / "kernels").glob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+megaapo\b", path.read_text(), re.M), path


def _sig(**kw):
    return kw


COMPILE_CASES = [   # (module, kernel, runtime signature, constexprs): one or two variants per kernel, most flags on
    ("fused_logprob", "_row_stats_kernel",
     _sig(z_ptr="*bf16", stride_z="i32", n_rows="i32", n_cols="i32", col_start="i32", tgt_ptr="*i64", inv_t="fp32",
          m_ptr="*fp32", s_ptr="*fp32", t_ptr="*fp32", zt_ptr="*fp32", lse_ptr="*fp32", ez_ptr="*fp32",
          logp_ptr="*fp32", ent_ptr="*fp32"),
     dict(ACCUM=True, FINALIZE=True, WANT_ENT=True, BLOCK_R=1, BLOCK_V=4096)),
    ("fused_logprob", "_row_grad_kernel",
     _sig(z_ptr="*fp32", stride_z="i32", dz_ptr="*bf16", stride_dz="i32", n_rows="i32", n_cols="i32",
          col_start="i32", tgt_ptr="*i64", inv_t="fp32", lse_ptr="*fp32", ez_ptr="*fp32", a_ptr="*fp32",
          b_ptr="*fp32"),
     dict(HAS_B=True, BLOCK_R=1, BLOCK_V=4096)),
    ("policy_loss", "_forward_kernel",
     _sig(lp_ptr="*fp32", old_ptr="*fp32", ref_ptr="*fp32", adv_ptr="*fp32", w_ptr="*fp32", tis_ptr="*fp32",
          ent_ptr="*fp32", mask_ptr="*i1", seq_ptr="*i64", acc_ptr="*fp32", ticket_ptr="*i32", coef_ptr="*fp32",
          out_ptr="*fp32", loss_ptr="*fp32", n="i32", row_len="i32", eps_low="fp32", eps_high="fp32", n_seq="i32",
          n_seq_f="fp32", num_tokens="fp32", num_seqs="fp32", norm_len="fp32", kl_coef="fp32",
          entropy_coef="fp32"),
     dict(HAS_LP=True, HAS_REF=True, HAS_W=True, HAS_TIS=True, HAS_ENT=True, SEQ_FROM_ROW=False,
          ADV_PER_TOKEN=False, PG=0, KL=3, AGG=1, KL_AGG=2, HAS_NT=True, HAS_NS=False, HAS_KL=True,
          ENT_BONUS=True, K=6, BLOCK=1024, BLOCK_S=1024)),
    ("policy_loss", "_grad_kernel",
     _sig(lp_ptr="*fp32", old_ptr="*fp32", ref_ptr="*fp32", adv_ptr="*fp32", w_ptr="*fp32", tis_ptr="*fp32",
          mask_ptr="*i1", seq_ptr="*i64", coef_ptr="*fp32", g_ptr="*fp32", glp_ptr="*fp32", gent_ptr="*fp32",
          start="i32", end="i32", row_len="i32", eps_low="fp32", eps_high="fp32", kl_coef="fp32",
          entropy_coef="fp32"),
     dict(HAS_REF=True, HAS_W=True, HAS_TIS=True, HAS_KL=True, ENT_BONUS=True, SEQ_FROM_ROW=False,
          ADV_PER_TOKEN=False, LP_LOCAL=True, PG=0, KL=1, BLOCK=1024)),
    ("group_advantage", "_group_adv_kernel",
     _sig(r_ptr="*fp32", g_ptr="*i64", c_ptr="*i8", len_ptr="*i64", adv_ptr="*fp32", klw_ptr="*fp32",
          mult_ptr="*fp32", diff_ptr="*fp32", pos_ptr="*i8", n="i32", eps="fp32", ln_base="fp32"),
     dict(EST=0, UNBIASED=True, HAS_APO=True, DADS=True, STCR=True, CODE=False, BLOCK_O=32, BLOCK_I=128)),
]


def compile_for_h100(case):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    module, name, sig, consts = case
    fn = getattr(importlib.import_module(f"kernels.{module}"), name)
    full = {a: ("constexpr" if a in consts else sig[a]) for a in fn.arg_names}
    src = ASTSource(fn, full, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32))


@pytest.mark.skipif(INTERPRET, reason="compiles the real kernels; the interpreter child has only Python ones")
@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: c[1])
def test_kernels_compile_for_h100(case):
    """The interpreter accepts code the GPU compiler rejects (types across branches, pointer/scalar mixes), so
    each kernel is also compiled to sm_90 machine code here; this needs Triton's bundled LLVM and ptxas, no GPU."""
    assert compile_for_h100(case).asm["cubin"]


@pytest.mark.skipif(INTERPRET, reason="compiles the real kernel; the interpreter child has only Python ones")
def test_policy_loss_ticket_ordering_in_ptx():
    """The interpreter runs programs one after another, so it cannot show the memory ordering of the forward's
    last-program-finalizes pattern; the sm_90 PTX can: a CTA barrier right before the single ticket atomic
    (acq_rel, gpu scope), every sum atomic at gpu scope, and the finalize reading and resetting the sums with
    atomics (exch), never plain loads."""
    import re
    case = next(c for c in COMPILE_CASES if c[1] == "_forward_kernel")
    code = [ln.strip() for ln in compile_for_h100(case).asm["ptx"].splitlines()
            if ln.strip() and not ln.strip().startswith(("//", ".loc", "$L__tmp"))]
    tickets = [i for i, ln in enumerate(code) if re.search(r"atom\.global\.gpu\.acq_rel\.add\.u32", ln)]
    assert len(tickets) == 1, "one ticket atomic"
    before = [ln for ln in code[:tickets[0]] if not ln.startswith(("mov", "setp", "or.", "and."))]
    assert before[-1].startswith("bar.sync"), f"no barrier before the ticket: {before[-3:]}"
    float_atomics = [ln for ln in code if re.search(r"\batom\.|\bred\.", ln) and "f32" in ln]
    assert float_atomics and all(".gpu." in ln for ln in float_atomics)
    after = code[tickets[0]:]
    assert any("exch.b32" in ln for ln in after), "the finalize resets the sums by atomic exchange"
    assert not any("ld.global" in ln for ln in after), "the finalize reads the sums only through atomics"


@pytest.mark.skipif(INTERPRET or torch.cuda.is_available(), reason="checks the plain-CPU fallback")
def test_cpu_fallback_is_the_reference():
    from kernels.fused_logprob import fused_logprob, fused_logprob_reference
    from kernels.group_advantage import group_advantage
    from kernels.policy_loss import LossSettings, policy_loss
    hidden, weight, targets = make_lm(5, 8, 11, torch.float32)
    assert torch.equal(fused_logprob(hidden, weight, targets)[0], fused_logprob_reference(hidden, weight, targets)[0])
    loss, _ = policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.ones(2, 3), LossSettings())
    assert loss.item() == -1.0
    assert group_advantage(torch.tensor([0.0, 1.0]), torch.tensor([0, 0])).advantages.shape == (2,)


# ------------------------------------------------------------------------------------------- TP=2 on gloo
def _tp_worker(rank, world, init_file, result_dir):
    import torch.distributed as dist
    from kernels.fused_logprob import LaunchConfig, fused_logprob
    from kernels.fused_policy_loss import fused_policy_loss
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n, h, v = 37, 48, 101                           # V odd: shards of 51 and 50 rows
        hidden, weight, targets = make_lm(n, h, v, torch.float32, seed=9)
        lo, hi = (0, 51) if rank == 0 else (51, 101)
        cfg = LaunchConfig(**SMALL)
        g = torch.Generator().manual_seed(2)
        g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
        out = {}
        for tp in (None, dist.group.WORLD):
            x = leaf(hidden)
            w = leaf(weight if tp is None else weight[lo:hi])
            # TP=2: rank 1's shard start is given explicitly (unequal shards); the default rank * V_local would
            # be 50 here, not 51
            lp, ent = fused_logprob(x, w, targets, 0.8, return_entropy=True, tp_group=tp,
                                    vocab_start=None if tp is None else lo, config=cfg)
            (lp * g_lp + ent * g_ent).sum().backward()
            out[tp is None] = (lp.detach(), ent.detach(), x.grad, w.grad)
        one, two = out[True], out[False]
        for name, a, b in [("logp", two[0], one[0]), ("entropy", two[1], one[1]), ("grad hidden", two[2], one[2]),
                           ("grad weight shard", two[3], one[3][lo:hi])]:
            close(a, b, 1e-5, f"TP=2 vs TP=1 {name}")
        # equal shards (Megatron's layout): vocab_start defaults to rank * V_local, as megaapo.models.logprob assumes
        w_even = torch.cat([weight, weight[:1]])
        lp1, _ = fused_logprob(hidden, w_even, targets, config=cfg)
        lp2, _ = fused_logprob(hidden, w_even[rank * 51:(rank + 1) * 51], targets, tp_group=dist.group.WORLD,
                               config=cfg)
        close(lp2, lp1, 1e-5, "TP=2 default vocab_start")
        s = settings(loss_agg="seq_mean_token_mean")
        b = rl_batch(b=1, t=n, seed=5, dtype=torch.float32)
        losses = {}
        for tp in (None, dist.group.WORLD):
            x = leaf(hidden)
            w = leaf(weight if tp is None else weight[lo:hi])
            loss, _ = fused_policy_loss(x, w, targets.view(1, n), b["logp_old"], b["advantages"], b["mask"], s,
                                        logp_ref=b["logp_ref"], tp_group=tp, vocab_start=0 if tp is None else lo,
                                        config=cfg)
            loss.backward()
            losses[tp is None] = (loss.detach(), x.grad, w.grad)
        close(losses[False][0], losses[True][0], 1e-5, "TP=2 fused loss")
        close(losses[False][1], losses[True][1], 1e-5, "TP=2 fused grad hidden")
        close(losses[False][2], losses[True][2][lo:hi], 1e-5, "TP=2 fused grad weight shard")
        (Path(result_dir) / f"ok{rank}").write_text("ok")
    finally:
        dist.destroy_process_group()


@kernel_test
@pytest.mark.distributed
def test_tp2_gloo_equals_tp1(tmp_path):
    """Vocab-parallel TP=2 (two processes on gloo, unequal shards) equals TP=1: forward, both gradients."""
    import torch.multiprocessing as mp
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


@pytest.mark.distributed
@pytest.mark.skipif(INTERPRET or torch.cuda.is_available(), reason="checks the plain-CPU fallback")
def test_tp2_gloo_reference_fallback(tmp_path):
    """The CPU fallback (pure-PyTorch reference) also handles TP=2."""
    import torch.multiprocessing as mp
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
