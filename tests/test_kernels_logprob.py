"""Tests of kernels/fused_logprob.py against an fp64 PyTorch reference, plus the checks that span every kernel:
PTX ordering without a GPU, the plain-CPU fallback, no imports from megaapo, and vocab-parallel TP=2 on gloo
(fused_logprob and fused_policy_loss). Every kernel variant is compiled by tests/test_kernels_compile.py. How they run (a TRITON_INTERPRET=1 child
pytest without CUDA, directly on a GPU with it) and the shared helpers: tests/kernel_harness.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the spawned TP workers import this module and kernel_harness by name

from kernel_harness import (  # noqa: E402
    DEV, INTERPRET, MODES, ROOT, SMALL, TOL, close, foreign_default_device, host_randn, kernel_test, leaf, make_lm,
    oracle_logits_dtype, rl_batch, settings)
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


# ------------------------------------------------------------------------------- launch choices (no kernel runs)
ANCHOR_SHAPES = [("3B", 2048, 151936), ("7B", 3584, 152064)]


@pytest.mark.skipif(INTERPRET, reason="pure arithmetic; runs in the parent process")
@pytest.mark.parametrize("dw", ["fp32 main_grad", "bf16 dW"])
def test_gradient_chunks_keep_dw_traffic_under_a_tenth_of_the_matmuls(dw):
    """Each gradient chunk reads and writes all of dW [V, H] once (cuBLAS's addmm into main_grad). At the ANCHORS
    shapes (3B, 7B; 8k and 32k tokens) the chunking the launcher picks keeps that traffic under 10% of the three
    GEMMs' time on an H100 (735 TFLOP/s: 6 N H V in 20.8 ms at 3B N=8192; 3.0 TB/s read + write), with a logits
    workspace of at most 1.2 GiB (Liger's whole op peaks at 1.0-1.8 GiB there; its dW, which ours adds to
    main_grad, is 0.6-1.0 GiB of that). The old fixed 256 MiB workspace gave 832-row chunks: 40% at 3B/32k."""
    import math

    from kernels.fused_logprob import LaunchConfig, _chunks
    flops, bandwidth = 735e12, 3.0e12
    dw_elem = 4 if dw == "fp32 main_grad" else 2
    for (_, h, v), n in [(shape, n) for shape in ANCHOR_SHAPES for n in (8192, 32768)]:
        rows, cols = _chunks(LaunchConfig(), n, v, 2, dw_elem)
        assert cols == v, "a gradient chunk spans the whole vocabulary"
        traffic = math.ceil(n / rows) * 2 * v * h * dw_elem / bandwidth
        matmul = 6 * n * h * v / flops
        assert traffic / matmul <= 0.10, f"H={h} N={n}: {rows}-row chunks, dW traffic {traffic / matmul:.0%}"
        assert rows * cols * 2 <= 1.2 * 2**30, f"H={h} N={n}: workspace {rows * cols * 2 / 2**30:.2f} GiB"


class _TorchWithoutOutDtype:
    """`torch` as torch 2.7 has it for this purpose: mm / addmm reject out_dtype (a missing API cannot be caused
    with the installed torch; everything else is the real torch)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def mm(*args, **kwargs):
        if "out_dtype" in kwargs:
            raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")
        return torch.mm(*args, **kwargs)

    @staticmethod
    def addmm(*args, **kwargs):
        if "out_dtype" in kwargs:
            raise TypeError("addmm() got an unexpected keyword argument 'out_dtype'")
        return torch.addmm(*args, **kwargs)


@pytest.mark.skipif(INTERPRET, reason="fake CUDA tensors; runs in the parent process")
def test_fp32_output_gemm_fallback_warns_once_with_its_cause(monkeypatch):
    """Without cuBLAS's fp32-output GEMM the weight gradient into an fp32 main_grad (and fp32 logits) fall back to
    fp32-upcast matmuls, ~10x slower: one warning says so and why, however often the fallback runs. On CUDA tensors
    only (faked: FakeTensorMode, no GPU here); with the installed torch the GEMM is there and nothing is said."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    import kernels.fused_logprob as fl

    def run():
        dw = torch.zeros(64, 16, device="cuda")
        dz, h = (torch.zeros(32, k, dtype=torch.bfloat16, device="cuda") for k in (64, 16))
        fl._accumulate_wgrad(dw, dz, h, first=False)
        fl._mm_into(torch.zeros(32, 64, device="cuda"), h, torch.zeros(16, 64, dtype=torch.bfloat16, device="cuda"))
        assert dw.dtype == torch.float32

    with FakeTensorMode():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            monkeypatch.setattr(fl, "torch", _TorchWithoutOutDtype())
            monkeypatch.setattr(fl, "_FP32_OUT", {}, raising=False)
            run()
            run()
        assert len(caught) == 1, [str(w.message) for w in caught]
        msg = str(caught[0].message)
        assert caught[0].category is RuntimeWarning
        assert "out_dtype" in msg and "TypeError" in msg and "10x slower" in msg and torch.__version__ in msg
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            monkeypatch.setattr(fl, "torch", torch)       # the installed torch (>= 2.10) has the GEMM
            monkeypatch.setattr(fl, "_FP32_OUT", {})
            run()
        assert not caught and fl.fp32_output_gemm(torch.device("cuda"), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp32_output_gemm_runs_on_this_gpu():
    """The fp32-output GEMM the weight gradient into main_grad relies on exists in this torch on this GPU (torch
    >= 2.10: addmm with an fp32 input and bf16 / fp16 operands), so no fp32-upcast fallback runs."""
    import kernels.fused_logprob as fl
    for dtype in (torch.bfloat16, torch.float16):
        assert fl.fp32_output_gemm(torch.device("cuda"), dtype), fl._FP32_OUT


# -------------------------------------------------------------------------------------------- every kernel
def test_kernels_import_nothing_from_megaapo():
    import re
    for path in (ROOT / "kernels").glob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+megaapo\b", path.read_text(), re.M), path


@pytest.mark.skipif(INTERPRET, reason="compiles the real kernel; the interpreter child has only Python ones")
def test_policy_loss_ticket_ordering_in_ptx():
    """The interpreter runs programs one after another, so it cannot show the memory ordering of the forward's
    last-program-finalizes pattern; the sm_90 PTX can: a CTA barrier right before the single ticket atomic
    (acq_rel, gpu scope), every sum atomic at gpu scope, and the finalize reading and resetting the sums with
    atomics (exch), never plain loads. The kernel is the one policy_loss launches (kernels.compile_check records
    the launch and binds it as Triton would)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import compile_check as cc
    with cc.recording() as log:
        cc.drive_policy_loss()
    launch = next(x for x in log if x.name == "_forward_kernel" and x.kwargs["HAS_LP"])
    signature, constexprs, attrs, options = cc._bind(launch, 90)
    ptx = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                         options=options.__dict__).asm["ptx"]
    code = [ln.strip() for ln in ptx.splitlines()
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
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with foreign_default_device():   # every tensor here must be on DEV (on a GPU run: cuda, not the CPU)
            _tp_checks(rank, dist)
        (Path(result_dir) / f"ok{rank}").write_text("ok")
    finally:
        dist.destroy_process_group()


def _tp_checks(rank, dist):
    from kernels.fused_logprob import LaunchConfig, fused_logprob
    from kernels.fused_policy_loss import fused_policy_loss
    n, h, v = 37, 48, 101                           # V odd: shards of 51 and 50 rows
    hidden, weight, targets = make_lm(n, h, v, torch.float32, seed=9)
    lo, hi = (0, 51) if rank == 0 else (51, 101)
    cfg = LaunchConfig(**SMALL)
    g = torch.Generator().manual_seed(2)
    g_lp, g_ent = host_randn(n, generator=g), host_randn(n, generator=g)
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
