"""Tests of kernels/policy_loss.py and kernels/fused_policy_loss.py: loss, metrics and gradients against an fp64
PyTorch reference and megaapo.algos.losses, packed vs padded layouts, launch counts and the self-resetting
workspace. How they run (a TRITON_INTERPRET=1 child pytest without CUDA, directly on a GPU with it) and the
shared helpers: tests/kernel_harness.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # kernel_harness is found under any --import-mode

from kernel_harness import (  # noqa: E402
    DEV, MODES, NATIVE, TOL, Launches, close, device_ops, kernel_test, leaf, make_lm, oracle_logits_dtype,
    rl_batch, settings)
from kernel_harness import _record_name, poison  # noqa: E402,F401  (autouse fixtures)


# --------------------------------------------------------------------------------------------- policy_loss
CASES = [dict(loss_agg=a, kl_agg=k, kl_estimator=e, policy_loss=p)
         for a, k in [("token_mean", "token_mean"), ("seq_mean_token_mean", "seq_mean_token_mean"),
                      ("seq_sum_norm", "seq_mean_token_mean"), ("token_mean", "seq_sum_norm")]
         for e in ("k1", "k2", "k3") for p in ("ppo_clip",)] + \
        [dict(policy_loss="vanilla", loss_agg="seq_mean_token_mean", kl_estimator="k3"),
         dict(policy_loss="ppo_clip", kl_coef=0.0, entropy_coef=0.0)]


@kernel_test
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_policy_loss_matches_megaapo(case):
    from megaapo.algos import losses as ref
    from kernels.policy_loss import policy_loss
    s = settings(**case)
    b = rl_batch(seed=len(str(case)))
    extra = dict(logp_ref=b["logp_ref"], kl_weight=b["kl_weight"], tis_weight=b["tis_weight"])
    lp32, ent32 = leaf(b["logp"], torch.float32), leaf(b["entropy"], torch.float32)
    f32 = lambda x: x.float()  # noqa: E731
    loss, met = policy_loss(lp32, f32(b["logp_old"]), f32(b["advantages"]), b["mask"], s, entropy=ent32,
                            **{k: f32(v) for k, v in extra.items()})
    loss.backward()
    lp64, ent64 = leaf(b["logp"]), leaf(b["entropy"])
    loss_r, met_r = ref.policy_loss(lp64, b["logp_old"], b["advantages"], b["mask"], s, entropy=ent64, **extra)
    loss_r.backward()
    close(loss, loss_r, 1e-5, "loss")
    assert set(met) == set(met_r)
    for k in met_r:
        close(met[k], met_r[k], 1e-5, k)
    close(lp32.grad, lp64.grad, 1e-5, "grad logp")
    if ent64.grad is None:           # entropy only enters the metrics without an entropy bonus
        assert ent32.grad is None or not ent32.grad.any()
    else:
        close(ent32.grad, ent64.grad, 1e-5, "grad entropy")


@kernel_test
@pytest.mark.parametrize("block", [8, 1024])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_sum_norm"])
def test_policy_loss_packed_equals_padded(monkeypatch, block, agg):
    """Packed tokens + seq_index (blocks spanning several sequences) give the padded result; explicit
    num_tokens / num_seqs override the local counts."""
    import kernels.policy_loss as pl
    monkeypatch.setattr(pl, "BLOCK", block)
    s = settings(loss_agg=agg)
    b = rl_batch(b=6, t=11, seed=11, dtype=torch.float32)
    keep = b["mask"].reshape(-1) | (torch.arange(66, device=DEV) % 4 == 0)   # drop some padding, keep some masked
    seq = torch.arange(6, device=DEV).repeat_interleave(11)[keep]
    tok = lambda x: x.reshape(-1)[keep]  # noqa: E731
    for nt, ns in [(None, None), (100.0, 9.0)]:
        lp_pad, lp_pack = leaf(b["logp"]), leaf(tok(b["logp"]))
        l1, m1 = pl.policy_loss(lp_pad, b["logp_old"], b["advantages"], b["mask"], s, logp_ref=b["logp_ref"],
                                kl_weight=b["kl_weight"], num_tokens=nt, num_seqs=ns)
        l2, m2 = pl.policy_loss(lp_pack, tok(b["logp_old"]), b["advantages"], tok(b["mask"]), s, seq_index=seq,
                                logp_ref=tok(b["logp_ref"]), kl_weight=b["kl_weight"], num_tokens=nt, num_seqs=ns)
        l3, _ = pl.policy_loss_reference(lp_pack.detach().double(), tok(b["logp_old"]).double(),
                                         b["advantages"].double(), tok(b["mask"]), s, seq_index=seq,
                                         logp_ref=tok(b["logp_ref"]).double(), kl_weight=b["kl_weight"].double(),
                                         num_tokens=nt, num_seqs=ns)
        (l1 + l2).backward()
        close(l2, l1, 1e-5, "packed loss")
        close(l3, l1.double(), 1e-5, "packed reference loss")
        for k in m1:
            close(m2[k], m1[k], 1e-5, k)
        close(lp_pack.grad, tok(lp_pad.grad), 1e-5, "packed grad")


@kernel_test
def test_policy_loss_70000_tokens_bf16():
    """More tokens than 65,535 programs' worth of rows; bf16 log-probs against the fp64 reference."""
    from kernels.policy_loss import policy_loss, policy_loss_reference
    s = settings(loss_agg="seq_mean_token_mean")
    g = torch.Generator().manual_seed(2)
    n, nseq = 70_000, 50
    seq = torch.sort(torch.randint(0, nseq, (n,), generator=g)).values.to(DEV)
    lp = (torch.randn(n, generator=g) * 0.3 - 1).to(DEV)
    old, refl = lp + 0.2 * torch.randn(n, generator=g).to(DEV), lp + 0.2 * torch.randn(n, generator=g).to(DEV)
    adv, mask = torch.randn(nseq, generator=g).to(DEV), (torch.rand(n, generator=g) > 0.2).to(DEV)
    x = leaf(lp, torch.bfloat16)
    loss, _ = policy_loss(x, old, adv, mask, s, logp_ref=refl, seq_index=seq)
    loss.backward()
    xr = leaf(x.detach(), torch.float64)
    loss_r, _ = policy_loss_reference(xr, old.double(), adv.double(), mask, s, logp_ref=refl.double(), seq_index=seq)
    loss_r.backward()
    close(loss, loss_r, 2e-2, "loss")
    close(x.grad, xr.grad, 2e-2, "grad logp")


def packed_batch(n_seq, seed, dtype=torch.float32):
    """Packed tokens of n_seq sequences of 1..11 tokens (one with none), seq ids ascending."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 12, (n_seq,), generator=g)
    lens[n_seq // 2] = 0                                  # a sequence with no tokens at all
    seq = torch.arange(n_seq).repeat_interleave(lens)
    n = seq.numel()
    lp = torch.randn(n, generator=g, dtype=torch.float64) * 0.3 - 1.0
    d = dict(logp=lp, logp_old=lp + 0.25 * torch.randn(n, generator=g, dtype=torch.float64),
             logp_ref=lp + 0.25 * torch.randn(n, generator=g, dtype=torch.float64),
             advantages=torch.randn(n_seq, generator=g, dtype=torch.float64), mask=torch.rand(n, generator=g) > 0.2,
             kl_weight=torch.rand(n_seq, generator=g, dtype=torch.float64),
             tis_weight=torch.rand(n, generator=g, dtype=torch.float64) + 0.5,
             entropy=torch.rand(n, generator=g, dtype=torch.float64) * 3, seq_index=seq)
    return {k: (v.to(dtype) if v.is_floating_point() else v).to(DEV) for k, v in d.items()}


def run_packed(fn, b, s, dtype):
    """fn(...) on batch b with logp and entropy as leaves of `dtype` -> (loss, metrics, grad logp, grad entropy)."""
    cast = lambda x: x.to(dtype) if x.is_floating_point() else x  # noqa: E731
    x, e = leaf(b["logp"], dtype), leaf(b["entropy"], dtype)
    loss, met = fn(x, cast(b["logp_old"]), cast(b["advantages"]), b["mask"], s, logp_ref=cast(b["logp_ref"]),
                   kl_weight=cast(b["kl_weight"]), tis_weight=cast(b["tis_weight"]), entropy=e,
                   seq_index=b["seq_index"])
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in met.items()}, x.grad, e.grad


@kernel_test
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_sum_norm"])
def test_policy_loss_one_launch_repeats_and_grows(monkeypatch, agg):
    """The self-resetting workspace: the same call three times gives the same numbers (and leaves the workspace
    zero, in the same buffer); a call with more sequences than the workspace holds grows it; the small call
    after that is unchanged. Blocks of 8 tokens put most sequences across program boundaries."""
    import kernels.policy_loss as pl
    monkeypatch.setattr(pl, "_WORKSPACE", {})
    monkeypatch.setattr(pl, "BLOCK", 8)
    s = settings(loss_agg=agg, kl_agg="seq_mean_token_mean", kl_estimator="k3")
    small, big = packed_batch(7, seed=1), packed_batch(150, seed=2)     # 150 > 64 sequences: the workspace grows
    if NATIVE:   # float atomics land in any order on a GPU: equal up to rounding, not bit for bit
        def same(a, b, what):
            close(a, b, 1e-6, what)
    else:        # the interpreter runs the programs in order
        def same(a, b, what):
            assert torch.equal(a, b), what

    def workspace():
        (buf,) = pl._WORKSPACE.values()
        return buf

    def check(out, b):
        ref = run_packed(pl.policy_loss_reference, b, s, torch.float64)
        close(out[0], ref[0], 1e-5, "loss")
        assert set(out[1]) == set(ref[1])
        for k in ref[1]:
            close(out[1][k], ref[1][k], 1e-5, k)
        close(out[2], ref[2], 1e-5, "grad logp")
        close(out[3], ref[3], 1e-5, "grad entropy")

    first = run_packed(pl.policy_loss, small, s, torch.float32)
    check(first, small)
    buf = workspace()
    assert not buf.any(), "the last program must leave the sums and the ticket at zero"
    for _ in range(2):
        again = run_packed(pl.policy_loss, small, s, torch.float32)
        assert workspace() is buf and not buf.any()
        for i, what in ((0, "loss"), (2, "grad logp"), (3, "grad entropy")):
            same(again[i], first[i], f"repeat: {what}")
        for k in first[1]:
            same(again[1][k], first[1][k], f"repeat: {k}")
    grown = run_packed(pl.policy_loss, big, s, torch.float32)
    check(grown, big)
    assert workspace().numel() > buf.numel() and not workspace().any()
    after = run_packed(pl.policy_loss, small, s, torch.float32)
    same(after[0], first[0], "after growth: loss")
    same(after[2], first[2], "after growth: grad logp")


@kernel_test
def test_policy_loss_forward_is_one_launch(monkeypatch):
    """Forward: one Triton launch and no other device work (no zero-fill, no copy) once the workspace exists;
    backward: one launch."""
    import kernels.policy_loss as pl
    launches = Launches(monkeypatch, pl, "_forward_kernel", "_grad_kernel")
    monkeypatch.setattr(pl, "torch", torch)   # unpoisoned: the NaN fills of the `poison` fixture are device work
    monkeypatch.setattr(pl, "BLOCK", 8)
    s = settings(loss_agg="seq_mean_token_mean", kl_estimator="k3", entropy_coef=0.0)
    b = packed_batch(9, seed=3)
    run_packed(pl.policy_loss, b, s, torch.float32)        # creates the workspace (its one zero-fill)
    launches.log.clear()
    x, e = leaf(b["logp"]), leaf(b["entropy"])
    with device_ops() as rec:
        loss, _ = pl.policy_loss(x, b["logp_old"], b["advantages"], b["mask"], s, logp_ref=b["logp_ref"],
                                 kl_weight=b["kl_weight"], tis_weight=b["tis_weight"], entropy=e,
                                 seq_index=b["seq_index"])
    assert launches.log == ["_forward_kernel"]
    assert rec.work == [], f"device work besides the kernel: {rec.work}"
    launches.log.clear()
    loss.backward()
    assert launches.log == ["_grad_kernel"]
    assert e.grad is None, "no entropy bonus: no entropy gradient (and no zero-fill for one)"


@kernel_test
def test_policy_loss_no_tokens():
    """An empty batch still gets its outputs written (one program runs the finalize)."""
    from kernels.policy_loss import policy_loss
    s = settings(loss_agg="seq_mean_token_mean")
    z = torch.zeros(0, device=DEV)
    loss, met = policy_loss(leaf(z), z, torch.ones(3, device=DEV), z.bool(), s, logp_ref=z,
                            seq_index=torch.zeros(0, dtype=torch.long, device=DEV))
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in met.values())


@kernel_test
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_sum_norm"])
def test_megaapo_policy_loss_uses_the_kernel(monkeypatch, agg, kl):
    """megaapo.algos.losses.policy_loss with MEGAAPO_TRITON=1 (the kernel) equals its PyTorch path
    (MEGAAPO_TRITON=0) in fp32: loss, metrics, gradients, on a padded batch with mask, DADS, TIS and entropy."""
    import kernels.policy_loss as pl
    from megaapo.algos import losses
    launches = Launches(monkeypatch, pl, "_forward_kernel")
    s = settings(loss_agg=agg, kl_agg=agg, kl_estimator=kl)
    b = rl_batch(b=6, t=11, seed=31, dtype=torch.float32)
    norm = dict(num_tokens=60.0, num_seqs=9.0) if kl == "k2" else {}     # explicit global normalisers too
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MEGAAPO_TRITON", flag)
        x, e = leaf(b["logp"]), leaf(b["entropy"])
        loss, met = losses.policy_loss(x, b["logp_old"], b["advantages"], b["mask"], s, logp_ref=b["logp_ref"],
                                       kl_weight=b["kl_weight"], tis_weight=b["tis_weight"], entropy=e, **norm)
        loss.backward()
        out[flag] = loss, met, x.grad, e.grad
    assert launches.log == ["_forward_kernel"], "MEGAAPO_TRITON=1 must run the kernel, =0 must not"
    (lk, mk, gk, ek), (lt, mt, gt, et) = out["1"], out["0"]
    assert lk.shape == lt.shape == () and lk.dtype == lt.dtype
    close(lk, lt, 1e-5, "loss")
    assert set(mk) == set(mt)
    for k in mt:
        close(mk[k], mt[k], 1e-5, k)
    close(gk, gt, 1e-5, "grad logp")
    close(ek, et, 1e-5, "grad entropy")


# --------------------------------------------------------------------------------------- fused_policy_loss
@kernel_test
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("wgrad", ["dtype", "main_grad"])
def test_fused_policy_loss(mode, layout, wgrad):
    from kernels.fused_logprob import LaunchConfig
    from kernels.fused_policy_loss import fused_policy_loss, fused_policy_loss_reference
    dtype, logits_dtype = MODES[mode]
    bsz, t, h, v = 4, 9, 48, 97
    s = settings(loss_agg="seq_mean_token_mean", kl_estimator="k3", entropy_coef=0.02)
    b = rl_batch(b=bsz, t=t, seed=21, dtype=torch.float32)
    hidden, weight, targets = make_lm(bsz * t, h, v, dtype, seed=4)
    kw = dict(logp_ref=b["logp_ref"], kl_weight=b["kl_weight"], tis_weight=b["tis_weight"])
    args = (b["logp_old"], b["advantages"], b["mask"])
    if layout == "padded":
        hidden, targets = hidden.view(bsz, t, h), targets.view(bsz, t)
    else:
        keep = b["mask"].reshape(-1)
        hidden, targets = hidden[keep], targets[keep]
        kw = dict(logp_ref=b["logp_ref"].reshape(-1)[keep], kl_weight=b["kl_weight"],
                  tis_weight=b["tis_weight"].reshape(-1)[keep],
                  seq_index=torch.arange(bsz, device=DEV).repeat_interleave(t)[keep])
        args = (b["logp_old"].reshape(-1)[keep], b["advantages"], b["mask"].reshape(-1)[keep])
    start = torch.randn(v, h, device=DEV)
    main_grad = start.clone() if wgrad == "main_grad" else None
    x, w = leaf(hidden), leaf(weight)
    loss, met, lp = fused_policy_loss(x, w, targets, *args, s, temperature=0.9, main_grad=main_grad,
                                      return_logp=True, logits_dtype=logits_dtype,
                                      config=LaunchConfig(chunk_rows=8, block_rows=4, block_vocab=32), **kw)
    loss.backward()
    xr, wr = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    d64 = lambda a: [y.double() if torch.is_tensor(y) and y.is_floating_point() else y for y in a]  # noqa: E731
    kw64 = {k: (y.double() if y.is_floating_point() else y) for k, y in kw.items()}
    loss_r, met_r, lp_r = fused_policy_loss_reference(xr, wr, targets, *d64(args), s, temperature=0.9,
                                                      return_logp=True, **kw64,
                                                      logits_dtype=oracle_logits_dtype(dtype, logits_dtype))
    loss_r.backward()
    tol = TOL[dtype]
    close(loss, loss_r, tol, "loss")
    close(lp, lp_r, tol, "logp")
    assert set(met) == set(met_r)
    for k in met_r:
        close(met[k], met_r[k], tol, k)
    close(x.grad, xr.grad, tol, "grad hidden")
    if wgrad == "main_grad":
        assert w.grad is None
        close(main_grad - start, wr.grad, tol, "main_grad increment")
    else:
        close(w.grad, wr.grad, tol, "grad weight")


@kernel_test
def test_fused_policy_loss_main_grad_rejects_scaled_backward():
    from kernels.fused_policy_loss import fused_policy_loss
    s = settings(kl_coef=0.0)
    hidden, weight, targets = make_lm(6, 48, 97, torch.float32)
    loss, _ = fused_policy_loss(leaf(hidden), leaf(weight), targets, torch.zeros(6, device=DEV),
                                torch.ones(2, device=DEV), torch.ones(6, device=DEV), s,
                                seq_index=torch.tensor([0, 0, 0, 1, 1, 1], device=DEV),
                                main_grad=torch.zeros(97, 48, device=DEV))
    if DEV == "cpu":
        with pytest.raises(RuntimeError):
            (loss * 2).backward()
