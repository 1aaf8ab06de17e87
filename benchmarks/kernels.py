"""Kernel benchmark: megaapo's Triton kernels against the 3-matmul floor, eager PyTorch, Liger and torch.compile.

Prints, for every ANCHORS.md shape (Qwen2.5-VL 3B / 7B lm_head, N = 8192 and 32768 tokens), in one run:
the 3-matmul floor, eager fwd+bwd, Liger fused linear CE (when importable), ours with the gradient made in the
forward (`fused_policy_loss`, weight grad in bf16 and into an fp32 main_grad) and ours with a recomputing backward
(`fused_logprob`), each with time, peak extra memory and max |logp - eager fp32 logp|; then forward-only against one
h @ W^T; then `policy_loss` fwd+bwd at 1M tokens and `group_advantage` over 1024 responses (groups of 8, DADS +
STCR) against eager megaapo.algos and torch.compile, with kernel-launch counts (ours: 1 launch forward for
policy_loss, 1 for group_advantage).

    python benchmarks/kernels.py                 # GPU: full table
    python benchmarks/kernels.py --write-docs    # ... and write it into docs/kernels.md (device, date)
    python benchmarks/kernels.py --smoke         # CPU (TRITON_INTERPRET=1) or GPU: tiny shapes, checks it all runs
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
SHAPES = [("3B", 2048, 151936), ("7B", 3584, 152064)]


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU under TRITON_INTERPRET=1)")
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/kernels.md")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--tokens", type=int, nargs="*", default=[8192, 32768])
    p.add_argument("--models", nargs="*", default=["3B", "7B"])
    return p.parse_args()


ARGS = parse()
if ARGS.smoke and os.environ.get("TRITON_INTERPRET") is None:
    import torch as _t   # noqa: E402  (only to ask for CUDA; kernels are imported after the switch below)
    if not _t.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"   # must precede the first import of kernels/

import torch  # noqa: E402

sys.path.insert(0, str(ROOT))
from kernels.fused_logprob import fused_logprob  # noqa: E402
from kernels.fused_policy_loss import fused_policy_loss  # noqa: E402
from kernels.group_advantage import group_advantage  # noqa: E402
from kernels.policy_loss import LossSettings, policy_loss  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


# ------------------------------------------------------------------------------------------------ measuring
def sync():
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, reps=None, warmup=2, reset=None):
    """Median milliseconds of fn() over reps runs (reset() runs untimed before each, e.g. to drop grads)."""
    reps = reps or ARGS.reps
    for _ in range(warmup):
        if reset:
            reset()
        fn()
    times = []
    for _ in range(reps):
        if reset:
            reset()
        sync()
        if CUDA:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra(fn, reset=None):
    """Peak bytes allocated by fn() above what was live before it (GiB); None on CPU."""
    if not CUDA:
        fn()
        return None
    if reset:
        reset()
    sync()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / GIB


def launches(fn, reset=None):
    """Number of GPU kernels fn() launches (profiler); None on CPU."""
    if not CUDA:
        return None
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):
        if reset:
            reset()
        fn()
    sync()
    if reset:
        reset()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def guarded(fn):
    """fn() or the reason it could not run (out of memory, missing package)."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory"
    except Exception as e:  # noqa: BLE001 - a benchmark row reports any failure instead of aborting the table
        return f"error: {type(e).__name__}: {str(e)[:80]}"


def fmt_ms(x):
    return x if isinstance(x, str) else f"{x:.3f} ms" if x < 1 else f"{x:.1f} ms"


def fmt_gib(x):
    return "n/a (CPU)" if x is None else x if isinstance(x, str) else f"{x:.2f} GiB"


def fmt_err(x):
    return x if isinstance(x, str) else "-" if x is None else f"{x:.1e}"


# --------------------------------------------------------------------------------------------- log-prob rows
def eager_logp(h, w, t, chunk=4096):
    """Eager's log-probs, `(h @ W.T).float().log_softmax(-1).gather(t)`, chunked so it always fits."""
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    with torch.no_grad():
        for i in range(0, h.shape[0], chunk):
            z = (h[i:i + chunk] @ w.t()).float()
            out[i:i + chunk] = z.log_softmax(-1).gather(1, t[i:i + chunk, None]).squeeze(1)
    return out


def rl_inputs(n, logp_ref_like):
    seq_len = min(1024, n)
    seq = torch.arange(n, device=DEV) // seq_len
    s_count = int(seq[-1]) + 1
    g = torch.Generator(device=DEV).manual_seed(0)
    noise = lambda: 0.05 * torch.randn(n, device=DEV, generator=g)  # noqa: E731
    return dict(logp_old=logp_ref_like + noise(), logp_ref=logp_ref_like + noise(),
                advantages=torch.randn(s_count, device=DEV, generator=g),
                mask=torch.ones(n, dtype=torch.bool, device=DEV), seq_index=seq, kl_weight=torch.rand(s_count,
                                                                                                     device=DEV))


def logprob_rows(name, h_dim, v, n):
    dt = torch.bfloat16 if CUDA else torch.float32
    g = torch.Generator(device=DEV).manual_seed(0)
    h = (torch.randn(n, h_dim, device=DEV, generator=g)).to(dt).requires_grad_()
    w = (torch.randn(v, h_dim, device=DEV, generator=g) * h_dim ** -0.5).to(dt).requires_grad_()
    t = torch.randint(0, v, (n,), device=DEV, generator=g)
    ref = eager_logp(h.detach(), w.detach(), t)

    def drop():
        h.grad = w.grad = None

    rows = []
    # the floor: the three bf16 products any fwd+bwd needs (no logits kept between them)
    with torch.no_grad():
        z = h @ w.t()
        t_fwd = timed(lambda: torch.mm(h, w.t(), out=z))
        t_dx = timed(lambda: z @ w)
        t_dw = timed(lambda: z.t() @ h)
        del z
    rows.append(("3-matmul floor", t_fwd + t_dx + t_dw, "-", None))

    def eager():
        logp = (h @ w.t()).float().log_softmax(-1).gather(1, t[:, None]).squeeze(1)
        logp.sum().backward()
    rows.append(("eager PyTorch", guarded(lambda: timed(eager, reset=drop)), guarded(lambda: peak_extra(eager, drop)),
                 0.0))

    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        lig = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        lig_none = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def liger():
            lig(w, h, t).backward()

        def liger_err():
            with torch.no_grad():
                return (-lig_none(w.detach(), h.detach(), t) - ref).abs().max().item()
        rows.append(("Liger fused linear CE", guarded(lambda: timed(liger, reset=drop)),
                     guarded(lambda: peak_extra(liger, drop)), guarded(liger_err)))
    except ImportError:
        rows.append(("Liger fused linear CE", "not installed", "-", None))

    rl = rl_inputs(n, ref)
    s = LossSettings(loss_agg="token_mean", kl_coef=1e-3, kl_estimator="k3", kl_agg="seq_mean_token_mean")
    for label, mg in (("ours, grad in fwd (6NHV), dW in weight dtype", False),
                      ("ours, grad in fwd (6NHV), fp32 main_grad", True)):
        main_grad = torch.zeros(v, h_dim, dtype=torch.float32, device=DEV) if mg else None

        def ours(main_grad=main_grad):
            loss, _ = fused_policy_loss(h, w, t, rl["logp_old"], rl["advantages"], rl["mask"], s,
                                        seq_index=rl["seq_index"], logp_ref=rl["logp_ref"], kl_weight=rl["kl_weight"],
                                        main_grad=main_grad)
            loss.backward()

        def ours_err():
            _, _, lp = fused_policy_loss(h.detach(), w.detach(), t, rl["logp_old"], rl["advantages"], rl["mask"], s,
                                         seq_index=rl["seq_index"], logp_ref=rl["logp_ref"],
                                         kl_weight=rl["kl_weight"], return_logp=True)
            return (lp - ref).abs().max().item()
        rows.append((label, guarded(lambda: timed(ours, reset=drop)), guarded(lambda: peak_extra(ours, drop)),
                     guarded(ours_err)))
        del main_grad

    def recompute():
        fused_logprob(h, w, t)[0].sum().backward()
    rows.append(("ours, recompute bwd (8NHV), dW in weight dtype", guarded(lambda: timed(recompute, reset=drop)),
                 guarded(lambda: peak_extra(recompute, drop)), None))

    # forward only (old-policy / reference passes) against one h @ W^T
    def fwd_only():
        with torch.no_grad():
            return fused_logprob(h, w, t)[0]

    def eager_fwd():
        with torch.no_grad():
            (h @ w.t()).float().log_softmax(-1).gather(1, t[:, None])
    f_ours = guarded(lambda: timed(fwd_only))
    f_err = guarded(lambda: (fwd_only() - ref).abs().max().item())
    fwd = [("one h @ W^T", t_fwd, "-", None),
           ("eager forward", guarded(lambda: timed(eager_fwd)), guarded(lambda: peak_extra(eager_fwd)), 0.0),
           ("ours forward", f_ours, guarded(lambda: peak_extra(fwd_only)), f_err)]
    del h, w
    return rows, fwd


# -------------------------------------------------------------------------------------------- small RL ops
def policy_loss_rows(tokens):
    from megaapo.algos import losses as eager_losses
    b, t = max(1, tokens // 4096), min(4096, tokens)
    g = torch.Generator(device=DEV).manual_seed(1)
    lp = (torch.randn(b, t, device=DEV, generator=g) * 0.3 - 1).requires_grad_()
    old, ref = lp.detach() + 0.1, lp.detach() - 0.1
    adv, w = torch.randn(b, device=DEV, generator=g), torch.rand(b, device=DEV, generator=g)
    mask = torch.rand(b, t, device=DEV, generator=g) > 0.1
    s = LossSettings(loss_agg="token_mean", kl_coef=1e-3, kl_estimator="k3", kl_agg="seq_mean_token_mean")
    kw = dict(logp_ref=ref, kl_weight=w, num_tokens=float(mask.sum()), num_seqs=float(b))

    def drop():
        lp.grad = None

    def run(f):
        return lambda: f(lp, old, adv, mask, s, **kw)[0].backward()

    def counts(f):
        """Kernel launches of the forward alone, and of forward + backward (the latter includes autograd's own
        fill of the seed gradient)."""
        fwd = guarded(lambda: launches(lambda: f(lp, old, adv, mask, s, **kw), drop))
        both = guarded(lambda: launches(run(f), drop))
        return None if fwd is None else f"{fwd} / {both}"
    # megaapo.algos.losses.policy_loss itself dispatches to the kernel on CUDA: eager is its PyTorch path
    eager_fn = eager_losses.policy_loss_torch
    eager = run(eager_fn)
    ref_loss = eager_fn(lp, old, adv, mask, s, **kw)[0].item()
    rows = [("eager megaapo.algos", guarded(lambda: timed(eager, reset=drop)), counts(eager_fn), 0.0)]
    if CUDA:
        comp_fn = torch.compile(eager_fn)
        rows.append(("torch.compile", guarded(lambda: timed(run(comp_fn), reset=drop)), counts(comp_fn), None))
    else:
        rows.append(("torch.compile", "skipped (CPU smoke)", None, None))
    ours = run(policy_loss)
    err = abs(policy_loss(lp, old, adv, mask, s, **kw)[0].item() - ref_loss)
    rows.append(("ours (kernels.policy_loss)", guarded(lambda: timed(ours, reset=drop)), counts(policy_loss), err))
    return rows


def group_advantage_rows(n_resp=1024, group=8):
    from megaapo.algos.advantages import compute_advantages
    from megaapo.algos.apo import apo_shaping
    g = torch.Generator(device=DEV).manual_seed(2)
    gid = torch.arange(n_resp // group, device=DEV).repeat_interleave(group)
    correct = torch.rand(n_resp, device=DEV, generator=g) > 0.5
    r = correct.float() + 0.5 * (torch.rand(n_resp, device=DEV, generator=g) > 0.3).float()
    lengths = torch.randint(50, 4096, (n_resp,), device=DEV, generator=g)

    def eager_fn():
        a = compute_advantages("grpo", r, gid, 1e-6)
        sh = apo_shaping(correct, lengths, a, gid, stcr_base=1.00001)
        return a * sh.adv_multiplier, sh.kl_weight

    def ours_fn():
        o = group_advantage(r, gid, eps=1e-6, correct=correct, lengths=lengths, stcr_base=1.00001)
        return o.advantages * o.adv_multiplier, o.kl_weight

    def ours_kernel_only():
        group_advantage(r, gid, eps=1e-6, correct=correct, lengths=lengths, stcr_base=1.00001)
    ea, ew = eager_fn()
    oa, ow = ours_fn()
    err = max((ea - oa).abs().max().item(), (ew - ow).abs().max().item())
    rows = [("eager megaapo.algos", timed(eager_fn), launches(eager_fn), 0.0)]
    if CUDA:
        comp = torch.compile(eager_fn)
        rows.append(("torch.compile", guarded(lambda: timed(comp)), guarded(lambda: launches(comp)), None))
    else:
        rows.append(("torch.compile", "skipped (CPU smoke)", None, None))
    rows.append(("ours (kernels.group_advantage)", timed(ours_kernel_only), launches(ours_kernel_only), err))
    return rows


# ------------------------------------------------------------------------------------------------- output
def table(title, header, rows):
    lines = [f"#### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main():
    device = torch.cuda.get_device_name() if CUDA else "CPU (Triton interpreter)" if os.environ.get(
        "TRITON_INTERPRET") == "1" else "CPU"
    stamp = datetime.date.today().isoformat()
    out = [f"Device: {device}; torch {torch.__version__}; date {stamp}; median of {ARGS.reps} after warm-up; "
           f"peak extra = max allocated above the live inputs, outputs and grads included.\n"]
    shapes = [("tiny", 48, 301)] if ARGS.smoke else [s for s in SHAPES if s[0] in ARGS.models]
    tokens = [64, 129] if ARGS.smoke else ARGS.tokens
    for name, h_dim, v in shapes:
        for n in tokens:
            rows, fwd = logprob_rows(name, h_dim, v, n)
            floor = rows[0][1]
            fmt = [(lbl, fmt_ms(ms), "" if isinstance(ms, str) else f"{ms / floor:.2f}x", fmt_gib(mem), fmt_err(e))
                   for lbl, ms, mem, e in rows]
            out.append(table(f"log-prob fwd+bwd, {name} (H={h_dim}, V={v}), N={n}",
                             ["method", "time", "vs floor", "peak extra", "max abs err vs eager"], fmt))
            mm = fwd[0][1]
            fmt = [(lbl, fmt_ms(ms), "" if isinstance(ms, str) else f"{ms / mm:.2f}x", fmt_gib(mem), fmt_err(e))
                   for lbl, ms, mem, e in fwd]
            out.append(table(f"log-prob forward only, {name}, N={n}",
                             ["method", "time", "vs h@W^T", "peak extra", "max abs err vs eager"], fmt))
            print("\n".join(out[-2:]), flush=True)
            if ARGS.write_docs:   # after every table: a run stopped at a time limit keeps what it measured
                write_docs("\n".join(out), smoke=ARGS.smoke, quiet=True)
            torch.cuda.empty_cache() if CUDA else None
    n_tok = 4096 if ARGS.smoke else 1 << 20
    rows = [(lbl, fmt_ms(ms), "n/a" if k is None else k, fmt_err(e)) for lbl, ms, k, e in policy_loss_rows(n_tok)]
    out.append(table(f"policy_loss fwd+bwd, {n_tok} tokens (PPO-clip + k3 KL, per-sequence weights)",
                     ["method", "time", "kernel launches (fwd / fwd+bwd)", "abs err of loss"], rows))
    print(out[-1], flush=True)
    n_resp = 64 if ARGS.smoke else 1024
    rows = [(lbl, fmt_ms(ms), "n/a" if k is None else k, fmt_err(e)) for lbl, ms, k, e in group_advantage_rows(n_resp)]
    out.append(table(f"group_advantage, {n_resp} responses in groups of 8 (GRPO + DADS + STCR)",
                     ["method", "time", "kernel launches", "max abs err"], rows))
    print(out[-1], flush=True)
    if ARGS.write_docs:
        write_docs("\n".join(out), smoke=ARGS.smoke)


def write_docs(text, smoke, quiet=False):
    path = ROOT / "docs" / "kernels.md"
    start, end = "<!-- benchmark:start -->", "<!-- benchmark:end -->"
    body = f"{start}\nCommand: `python benchmarks/kernels.py{' --smoke' if smoke else ''} --write-docs`\n\n{text}{end}"
    doc = path.read_text() if path.exists() else "# Kernels\n\n"
    doc = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: body, doc, flags=re.S) if start in doc \
        else doc + "\n" + body + "\n"
    path.write_text(doc)
    if not quiet:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
