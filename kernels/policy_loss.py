"""Fused RL policy loss: ratio, PPO-clip (separate low/high eps), KL k1/k2/k3 with per-sequence weights, masks and
the loss aggregation modes of `megaapo.algos.losses`, forward and backward.

Called by the learner on per-token log-probs (and by `kernels.fused_policy_loss`, which reuses the kernels below
inside the log-prob pass). Public API: `policy_loss` (autograd-aware, same signature and semantics as
`megaapo.algos.losses.policy_loss`, plus `seq_index` for packed batches) and `policy_loss_reference`.

Layouts: padded token tensors [B, T] (sequence = row), or packed flat tokens [N] with `seq_index` [N] in [0, S)
and per-sequence tensors [S]. The settings object `s` is duck-typed: `megaapo.algos.losses.LossSettings` or this
module's `LossSettings` (same fields).

What is fused. Forward: ONE launch. Each program of a token-parallel kernel computes every per-token term (ratio,
clipped surrogate, KL, clip flag) and adds them into per-sequence sums with atomics (one scalar atomic per sum
when the block lies in one sequence), then draws a ticket from an atomic counter; the program that draws the last
ticket turns the sums into the aggregation coefficients, the loss and the metrics (looping over the S sequences
in blocks), and puts the sums and the counter back to zero. The workspace (sums + counter) is cached per device
and stream, allocated zeroed on first use and when a call has more sequences than it holds (the only extra
launch: one zero-fill); every launch leaves it zero for the next. No host sync anywhere. Backward: one
token-parallel kernel recomputes the per-token terms and writes dL/dlogp (and dL/dentropy). Memory traffic: the
token inputs are read twice (forward, backward) and dL/dlogp written once, ~30 B/token; per-sequence state O(S).
Concurrency: calls on one stream are ordered by the stream; each stream has its own workspace. A launch that is
aborted midway would leave partial sums: the launcher drops the workspace when the launch raises.
Deviation from plain PyTorch: masked-out tokens contribute exactly 0 even if their inputs are NaN/inf.

Fallback: on CPU tensors without TRITON_INTERPRET=1 `policy_loss` runs `policy_loss_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels._common import next_pow2, on_gpu, use_triton

PG_MODES = {"ppo_clip": 0, "vanilla": 1}
KL_MODES = {"k1": 1, "k2": 2, "k3": 3}
AGG_MODES = {"token_mean": 0, "seq_mean_token_mean": 1, "seq_sum_norm": 2}
METRICS = ("pg_loss", "clip_frac", "kl", "kl_loss", "entropy")
_K = 6   # per-sequence sums: mask, m*tis*pg, m*w*kl, m*clipped, m*kl, m*entropy
BLOCK = 1024   # tokens per program of the token kernels (tests shrink it to cross sequence boundaries)
# 8 warps: 4 tokens per thread. With the settings as runtime arguments every branch is compiled in, and at 4 warps
# the kernels need 108-144 registers (sm_90); at 8, 61-76 (docs/kernels.md), so more programs stay resident.
WARPS = 8


@dataclass
class LossSettings:
    """Mirror of `megaapo.algos.losses.LossSettings` (kernels import nothing from megaapo)."""
    policy_loss: str = "ppo_clip"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    loss_agg: str = "token_mean"
    loss_agg_norm_len: int = 0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_agg: str = "seq_mean_token_mean"
    entropy_coef: float = 0.0


def _mode(table, name, what):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(table)}")
    return table[name]


# ---------------------------------------------------------------------------------------------------- kernels
# What Triton compiles these kernels for: the dtypes of the token pointers (fp32 floats, a bool or fp32 mask, int64
# sequence ids; the launcher converts anything else) and the few constexprs, nothing else. The loss settings, the
# optional inputs and the layout are runtime scalars (uniform branches, a few flops per token in a kernel bound by
# launch latency), integer sizes are not specialised and neither is pointer alignment (callers pass views at any
# offset): so a new setting or batch shape never compiles a new kernel mid-run, and `kernels.compile_check` can
# compile every variant ahead of time.
_INTS = ["n", "row_len", "n_seq", "start", "end", "pg_mode", "kl_mode", "agg", "kl_agg", "has_ref", "has_w",
         "has_tis", "has_ent", "seq_from_row", "adv_per_token", "has_nt", "has_ns", "has_kl", "ent_bonus",
         "lp_local"]
_PTRS = ["lp_ptr", "old_ptr", "ref_ptr", "adv_ptr", "w_ptr", "tis_ptr", "ent_ptr", "mask_ptr", "seq_ptr", "acc_ptr",
         "ticket_ptr", "coef_ptr", "out_ptr", "loss_ptr", "g_ptr", "glp_ptr", "gent_ptr"]


@triton.jit
def _token_terms(lp, old, ref, adv, eps_low, eps_high, pg_mode, kl_mode):
    """Per-token (pg, clipped, dpg/dlp, kl, dkl/dlp); pg_mode, kl_mode: PG_MODES, KL_MODES values (runtime)."""
    ratio = tl.exp(lp - old)
    u = ratio * adv
    c = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high) * adv
    clip = pg_mode == 0
    clipped = (c < u) & clip
    pg = tl.where(clip, -tl.minimum(u, c), -u)
    # the clamp branch is active only when it is strictly smaller; on ties both branches carry -A*rho
    dpg = tl.where(clipped, 0.0, -u)
    d = lp - ref
    e = tl.exp(-d)
    kl = tl.where(kl_mode == 1, d, tl.where(kl_mode == 2, 0.5 * d * d, e + d - 1.0))
    dkl = tl.where(kl_mode == 1, 1.0, tl.where(kl_mode == 2, d, 1.0 - e))
    return pg, clipped, dpg, kl, dkl


@triton.jit
def _load_token(offs, valid, lp_ptr, old_ptr, ref_ptr, adv_ptr, w_ptr, tis_ptr, mask_ptr, seq_ptr, row_len,
                HAS_LP: tl.constexpr, has_ref, has_w, has_tis, seq_from_row, adv_per_token):
    # Absent inputs are masked loads that touch no memory (their pointers are placeholders) and take the neutral
    # value instead; seq_from_row: padded [B, T] (sequence = row), else packed with sequence ids.
    seq = tl.where(seq_from_row != 0, offs // row_len,
                   tl.load(seq_ptr + offs, mask=valid & (seq_from_row == 0), other=0).to(tl.int64))
    m = tl.load(mask_ptr + offs, mask=valid, other=0).to(tl.float32)
    m = tl.where(valid, m, 0.0)
    if HAS_LP:
        lp = tl.load(lp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    else:   # counting pass of the fused loss: no log-probs exist yet, and lp_ptr is a placeholder
        lp = tl.zeros_like(m)
    old = tl.load(old_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ref = tl.where(has_ref != 0, tl.load(ref_ptr + offs, mask=valid & (has_ref != 0), other=0.0).to(tl.float32), lp)
    adv_idx = tl.where(adv_per_token != 0, offs, seq)
    adv = tl.load(adv_ptr + adv_idx, mask=valid, other=0.0).to(tl.float32)
    w = tl.where(has_w != 0, tl.load(w_ptr + seq, mask=valid & (has_w != 0), other=0.0).to(tl.float32), 1.0)
    tis = tl.where(has_tis != 0, tl.load(tis_ptr + offs, mask=valid & (has_tis != 0), other=0.0).to(tl.float32), 1.0)
    return seq, m, lp, old, ref, adv, w, tis


@triton.jit
def _accumulate(offs, valid, lp_ptr, old_ptr, ref_ptr, adv_ptr, w_ptr, tis_ptr, ent_ptr, mask_ptr, seq_ptr, acc_ptr,
                row_len, eps_low, eps_high, HAS_LP: tl.constexpr, has_ref, has_w, has_tis, has_ent, seq_from_row,
                adv_per_token, pg_mode, kl_mode, K: tl.constexpr):
    """Add this block's per-token terms into the per-sequence sums acc[seq * K + j]."""
    seq, m, lp, old, ref, adv, w, tis = _load_token(offs, valid, lp_ptr, old_ptr, ref_ptr, adv_ptr, w_ptr, tis_ptr,
                                                    mask_ptr, seq_ptr, row_len, HAS_LP, has_ref, has_w, has_tis,
                                                    seq_from_row, adv_per_token)
    on = m != 0.0
    zero = tl.zeros_like(m)
    v_pg, v_klw, v_clip, v_kl, v_ent = zero, zero, zero, zero, zero
    if HAS_LP:
        pg, clipped, dpg, kl, dkl = _token_terms(lp, old, ref, adv, eps_low, eps_high, pg_mode, kl_mode)
        v_pg = tl.where(on, m * tis * pg, 0.0)
        v_clip = tl.where(on & clipped, m, 0.0)
        v_klw = tl.where(on & (has_ref != 0), m * w * kl, 0.0)
        v_kl = tl.where(on & (has_ref != 0), m * kl, 0.0)
        ent = tl.load(ent_ptr + offs, mask=valid & (has_ent != 0), other=0.0).to(tl.float32)
        v_ent = tl.where(on & (has_ent != 0), m * ent, 0.0)
    s_lo = tl.min(tl.where(valid, seq, 2**62), axis=0)
    s_hi = tl.max(tl.where(valid, seq, -1), axis=0)
    if s_lo == s_hi:
        # whole block in one sequence (the common case for long responses): one atomic per sum, not per token
        # (distinct names in the two branches: Triton yields names bound in both, and the types differ here)
        one_seq = acc_ptr + s_lo * K
        tl.atomic_add(one_seq + 0, tl.sum(m, axis=0))
        if HAS_LP:
            tl.atomic_add(one_seq + 1, tl.sum(v_pg, axis=0))
            tl.atomic_add(one_seq + 2, tl.sum(v_klw, axis=0))
            tl.atomic_add(one_seq + 3, tl.sum(v_clip, axis=0))
            tl.atomic_add(one_seq + 4, tl.sum(v_kl, axis=0))
            tl.atomic_add(one_seq + 5, tl.sum(v_ent, axis=0))
    else:
        per_tok = acc_ptr + seq * K
        tl.atomic_add(per_tok + 0, m, mask=valid)
        if HAS_LP:
            tl.atomic_add(per_tok + 1, v_pg, mask=valid)
            tl.atomic_add(per_tok + 2, v_klw, mask=valid)
            tl.atomic_add(per_tok + 3, v_clip, mask=valid)
            tl.atomic_add(per_tok + 4, v_kl, mask=valid)
            tl.atomic_add(per_tok + 5, v_ent, mask=valid)


@triton.jit
def _agg_coef(n_s, agg, tok_den, seq_den_mean, seq_den_norm):
    """Per-sequence weight of an AGG_MODES aggregation (runtime agg); the unselected forms may divide by zero."""
    return tl.where(agg == 0, 1.0 / tok_den, tl.where(agg == 1, 1.0 / (tl.maximum(n_s, 1.0) * seq_den_mean),
                                                       1.0 / seq_den_norm))


@triton.jit
def _take(ptr, sm, RESET: tl.constexpr):
    """Read sums that other programs built with atomics: atomically (served by L2, where those atomics landed; a
    plain load could hit a stale L1 line), and with RESET swap in the zero the next launch starts from."""
    if RESET:
        # as int32 bits: the interpreter has no float atomic exchange
        v = tl.atomic_xchg(ptr.to(tl.pointer_type(tl.int32)), 0, mask=sm).to(tl.float32, bitcast=True)
    else:
        v = tl.atomic_add(ptr, 0.0, mask=sm)
    return tl.where(sm, v, 0.0)


@triton.jit
def _finalize(acc_ptr, coef_ptr, out_ptr, loss_ptr, n_seq, n_seq_f, num_tokens, num_seqs, norm_len, kl_coef,
              entropy_coef, agg, kl_agg, has_nt, has_ns, has_kl, ent_bonus, K: tl.constexpr, BLOCK_S: tl.constexpr):
    """Sums -> coef [S, 2] (loss, KL aggregation weights), out [6] (loss + metrics), loss; leaves the sums zero.
    Run by one program, over S in blocks of BLOCK_S (pass 1: the normalisers, pass 2: the rest)."""
    tot = tl.zeros((BLOCK_S,), tl.float32)
    nonempty = tl.zeros((BLOCK_S,), tl.float32)
    for s0 in range(0, n_seq, BLOCK_S):
        idx = s0 + tl.arange(0, BLOCK_S)
        n_s = _take(acc_ptr + idx * K, idx < n_seq, False)
        tot += n_s
        nonempty += tl.where(n_s > 0, 1.0, 0.0)
    n_tok = tl.sum(tot, axis=0)
    tok_den = tl.where(has_nt != 0, tl.maximum(num_tokens, 1.0), tl.maximum(n_tok, 1.0))
    seq_den_mean = tl.where(has_ns != 0, tl.maximum(num_seqs, 1.0), tl.maximum(tl.sum(nonempty, axis=0), 1.0))
    seq_den_norm = tl.where(has_ns != 0, tl.maximum(num_seqs, 1.0), tl.maximum(n_seq_f, 1.0)) * norm_len
    pg = tl.zeros((BLOCK_S,), tl.float32)
    klt = tl.zeros((BLOCK_S,), tl.float32)
    ent = tl.zeros((BLOCK_S,), tl.float32)
    clip = tl.zeros((BLOCK_S,), tl.float32)
    kl = tl.zeros((BLOCK_S,), tl.float32)
    for s0 in range(0, n_seq, BLOCK_S):
        idx = s0 + tl.arange(0, BLOCK_S)
        sm = idx < n_seq
        row = acc_ptr + idx * K
        n_s = _take(row, sm, True)
        c_loss = _agg_coef(n_s, agg, tok_den, seq_den_mean, seq_den_norm)
        c_kl = _agg_coef(n_s, kl_agg, tok_den, seq_den_mean, seq_den_norm)
        tl.store(coef_ptr + idx * 2, c_loss, mask=sm)
        tl.store(coef_ptr + idx * 2 + 1, c_kl, mask=sm)
        pg += tl.where(sm, c_loss * _take(row + 1, sm, True), 0.0)
        klt += tl.where(sm, c_kl * _take(row + 2, sm, True), 0.0)
        clip += _take(row + 3, sm, True)
        kl += _take(row + 4, sm, True)
        ent += tl.where(sm, c_loss * _take(row + 5, sm, True), 0.0)
    pg_s, klt_s, ent_s = tl.sum(pg, axis=0), tl.sum(klt, axis=0), tl.sum(ent, axis=0)
    n_valid = tl.maximum(n_tok, 1.0)
    loss = pg_s
    loss += tl.where(has_kl != 0, kl_coef * klt_s, 0.0)
    loss -= tl.where(ent_bonus != 0, entropy_coef * ent_s, 0.0)
    tl.store(out_ptr + 0, loss)
    tl.store(loss_ptr, loss)
    tl.store(out_ptr + 1, pg_s)
    tl.store(out_ptr + 2, tl.sum(clip, axis=0) / n_valid)
    tl.store(out_ptr + 3, tl.sum(kl, axis=0) / n_valid)
    tl.store(out_ptr + 4, klt_s)
    tl.store(out_ptr + 5, ent_s)


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_PTRS)
def _forward_kernel(lp_ptr, old_ptr, ref_ptr, adv_ptr, w_ptr, tis_ptr, ent_ptr, mask_ptr, seq_ptr, acc_ptr,
                    ticket_ptr, coef_ptr, out_ptr, loss_ptr, n, row_len, eps_low, eps_high, n_seq, n_seq_f,
                    num_tokens, num_seqs, norm_len, kl_coef, entropy_coef, has_ref, has_w, has_tis, has_ent,
                    seq_from_row, adv_per_token, pg_mode, kl_mode, agg, kl_agg, has_nt, has_ns, has_kl, ent_bonus,
                    HAS_LP: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr):
    """The whole forward: per-sequence sums by atomics, then the last program to finish finalizes (see module)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _accumulate(offs, offs < n, lp_ptr, old_ptr, ref_ptr, adv_ptr, w_ptr, tis_ptr, ent_ptr, mask_ptr, seq_ptr,
                acc_ptr, row_len, eps_low, eps_high, HAS_LP, has_ref, has_w, has_tis, has_ent, seq_from_row,
                adv_per_token, pg_mode, kl_mode, K)
    # Every thread's atomics (acq_rel, gpu scope) must be performed before this program's ticket is drawn: the
    # barrier orders them before thread 0's ticket atomic, whose release then publishes them with it.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        # all other programs have drawn theirs, so all their sums are in (acquire side of the ticket)
        _finalize(acc_ptr, coef_ptr, out_ptr, loss_ptr, n_seq, n_seq_f, num_tokens, num_seqs, norm_len, kl_coef,
                  entropy_coef, agg, kl_agg, has_nt, has_ns, has_kl, ent_bonus, K, BLOCK_S)
        tl.atomic_xchg(ticket_ptr, 0)


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_PTRS)
def _grad_kernel(lp_ptr, old_ptr, ref_ptr, adv_ptr, w_ptr, tis_ptr, mask_ptr, seq_ptr, coef_ptr, g_ptr,
                 glp_ptr, gent_ptr, start, end, row_len, eps_low, eps_high, kl_coef, entropy_coef,
                 has_ref, has_w, has_tis, has_kl, ent_bonus, seq_from_row, adv_per_token, lp_local, pg_mode, kl_mode,
                 BLOCK: tl.constexpr):
    """dL/dlogp (and, with ent_bonus, dL/dentropy) for tokens [start, end), written at offset - start.
    lp_local: lp_ptr holds only that range (the chunk of the fused log-prob pass)."""
    local = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs = start + local
    valid = offs < end
    lp_base = lp_ptr - start * lp_local
    seq, m, lp, old, ref, adv, w, tis = _load_token(offs, valid, lp_base, old_ptr, ref_ptr, adv_ptr, w_ptr, tis_ptr,
                                                    mask_ptr, seq_ptr, row_len, True, has_ref, has_w, has_tis,
                                                    seq_from_row, adv_per_token)
    g = tl.load(g_ptr).to(tl.float32)
    c_loss = tl.load(coef_ptr + seq * 2, mask=valid, other=0.0)
    pg, clipped, dpg, kl, dkl = _token_terms(lp, old, ref, adv, eps_low, eps_high, pg_mode, kl_mode)
    d = tis * c_loss * dpg
    c_kl = tl.load(coef_ptr + seq * 2 + 1, mask=valid & (has_kl != 0), other=0.0)
    d += tl.where(has_kl != 0, kl_coef * w * c_kl * dkl, 0.0)
    on = m != 0.0
    tl.store(glp_ptr + local, tl.where(on, g * m * d, 0.0), mask=valid)
    tl.store(gent_ptr + local, tl.where(on, -g * entropy_coef * m * c_loss, 0.0), mask=valid & (ent_bonus != 0))


# --------------------------------------------------------------------------------------------------- launcher
@dataclass
class _Batch:
    """Flat token tensors in the kernels' dtypes, and the layout that describes them."""
    lp: Optional[torch.Tensor]
    old: torch.Tensor
    ref: Optional[torch.Tensor]
    adv: torch.Tensor
    w: Optional[torch.Tensor]
    tis: Optional[torch.Tensor]
    ent: Optional[torch.Tensor]
    mask: torch.Tensor
    seq: Optional[torch.Tensor]
    row_len: int
    n_seq: int
    adv_per_token: bool
    lp_shape: tuple = ()


def flatten_batch(logp, logp_old, advantages, mask, *, seq_index=None, logp_ref=None, kl_weight=None,
                  tis_weight=None, entropy=None) -> _Batch:
    """Normalise [B, T] or packed [N] (+ seq_index) inputs into flat contiguous tensors in the dtypes the kernels
    are compiled for: fp32 floats, a bool or fp32 mask, int64 sequence ids (no copies when they already are)."""
    def flat(x, dtype=torch.float32):
        return None if x is None else x.reshape(-1).contiguous().to(dtype)

    if seq_index is None:
        if logp_old.dim() != 2:
            raise ValueError("policy_loss: token tensors must be [B, T], or [N] with seq_index [N]")
        b, t = logp_old.shape
        per_token = advantages.dim() == 2
        seq, row_len = None, t
    else:
        b, row_len, per_token = advantages.shape[0], 1, False
        seq = flat(seq_index, torch.int64)
        if advantages.dim() != 1:
            raise ValueError("policy_loss: packed inputs take per-sequence advantages [S]")
    return _Batch(flat(logp), flat(logp_old), flat(logp_ref), flat(advantages), flat(kl_weight), flat(tis_weight),
                  flat(entropy), flat(mask, torch.bool if mask.dtype == torch.bool else torch.float32), seq,
                  max(row_len, 1), b, per_token)


def _cfg(s):
    pg = _mode(PG_MODES, s.policy_loss, "policy loss")
    kl = _mode(KL_MODES, s.kl_estimator, "KL estimator")
    agg = _mode(AGG_MODES, s.loss_agg, "loss aggregation")
    kl_agg = _mode(AGG_MODES, s.kl_agg, "KL aggregation")
    if 2 in (agg, kl_agg) and not s.loss_agg_norm_len:
        raise ValueError("seq_sum_norm needs norm_len (the constant; Dr.GRPO uses the max generation length)")
    return pg, kl, agg, kl_agg


def _flags(bt: _Batch, s):
    """The runtime flags both kernels take (ints, so that the launch never specialises on them)."""
    pg, kl, _, _ = _cfg(s)
    return dict(has_ref=int(bt.ref is not None), has_w=int(bt.w is not None), has_tis=int(bt.tis is not None),
                seq_from_row=int(bt.seq is None), adv_per_token=int(bt.adv_per_token), pg_mode=pg, kl_mode=kl)


def _block(dev: torch.device, n: int, block: Optional[int]) -> int:
    """Tokens per program: fixed on a GPU (one compiled kernel for every batch size); the interpreter runs each
    program in Python, so small batches take one small program there."""
    block = block or BLOCK
    return block if on_gpu(dev) else min(block, next_pow2(n))


# Per (device, stream) workspace of the forward: fp32 sums [cap * K] then one int32 ticket counter, in one buffer.
# Zero when handed out; every launch's last program leaves it zero again, so it is zero-filled only when created.
_WORKSPACE: dict = {}


def _workspace_key(dev: torch.device):
    # calls on one stream run one after another; two streams at once would interleave their atomics on one buffer
    stream = torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0
    return dev.type, dev.index, stream


def _workspace(dev: torch.device, n_seq: int):
    """(sums [>= n_seq * K] fp32, ticket [1] int32) for the current stream of `dev`, both zero."""
    key = _workspace_key(dev)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() - 1 < n_seq * _K:
        cap = next_pow2(max(n_seq, 64))   # grow geometrically: a few zero-fills over a run, not one per new max S
        buf = _WORKSPACE[key] = torch.zeros(cap * _K + 1, dtype=torch.float32, device=dev)
    return buf[:-1], buf[-1:].view(torch.int32)


def seq_coefficients(bt: _Batch, s, num_tokens, num_seqs, with_lp: bool, block: Optional[int] = None):
    """The one forward launch -> (coef [S, 2] per-sequence aggregation weights, out [6] loss + metrics,
    loss 0-d: the same loss in its own tensor, so autograd never sees a view of `out`).

    with_lp=False only counts tokens (the fused log-prob pass needs the weights before any log-prob exists)."""
    _, _, agg, kl_agg = _cfg(s)
    n = bt.mask.numel()
    dev = bt.mask.device
    acc, ticket = _workspace(dev, bt.n_seq)
    coef = torch.empty(bt.n_seq, 2, dtype=torch.float32, device=dev)
    out = torch.empty(6, dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    dummy = acc
    no_seq = bt.seq if bt.seq is not None else torch.empty(1, dtype=torch.int64, device=dev)  # same dtype: one variant
    block = _block(dev, n, block)
    block_s = 1024 if on_gpu(dev) else min(1024, next_pow2(bt.n_seq))
    try:
        # at least one program, even for n = 0: the last (only) program is the one that writes the outputs
        _forward_kernel[(max(1, triton.cdiv(n, block)),)](
            bt.lp if with_lp else dummy, bt.old, bt.ref if bt.ref is not None else dummy, bt.adv,
            bt.w if bt.w is not None else dummy, bt.tis if bt.tis is not None else dummy,
            bt.ent if bt.ent is not None else dummy, bt.mask, no_seq, acc, ticket,
            coef, out, loss, n, bt.row_len, float(s.clip_eps_low), float(s.clip_eps_high), bt.n_seq,
            float(bt.n_seq), float(num_tokens or 0.0), float(num_seqs or 0.0), float(s.loss_agg_norm_len or 0),
            float(s.kl_coef), float(s.entropy_coef), has_ent=int(bt.ent is not None), agg=agg, kl_agg=kl_agg,
            has_nt=int(num_tokens is not None), has_ns=int(num_seqs is not None), has_kl=int(s.kl_coef > 0),
            ent_bonus=int(bt.ent is not None and s.entropy_coef > 0), **_flags(bt, s),
            HAS_LP=with_lp, K=_K, BLOCK=block, BLOCK_S=block_s, num_warps=WARPS)
    except BaseException:
        _WORKSPACE.pop(_workspace_key(dev), None)   # a launch stopped midway may have left partial sums behind
        raise
    return coef, out, loss


def token_grads(bt: _Batch, s, coef, g, start: int, end: int, lp_local=None, ent_bonus=None,
                block: Optional[int] = None):
    """dL/dlogp [end-start] (and dL/dentropy, or None) for tokens [start, end); g: a 1-element upstream gradient.

    lp_local: log-probs of just that range (the fused pass); default: bt.lp."""
    n = end - start
    dev = bt.mask.device
    glp = torch.empty(n, dtype=torch.float32, device=dev)
    bonus = (bt.ent is not None if ent_bonus is None else ent_bonus) and s.entropy_coef > 0
    gent = torch.empty(n, dtype=torch.float32, device=dev) if bonus else None
    block = _block(dev, n, block)
    no_seq = bt.seq if bt.seq is not None else torch.empty(1, dtype=torch.int64, device=dev)
    _grad_kernel[(triton.cdiv(n, block),)](
        lp_local if lp_local is not None else bt.lp, bt.old, bt.ref if bt.ref is not None else coef, bt.adv,
        bt.w if bt.w is not None else coef, bt.tis if bt.tis is not None else coef, bt.mask,
        no_seq, coef, g, glp, gent if bonus else glp, start, end, bt.row_len,
        float(s.clip_eps_low), float(s.clip_eps_high), float(s.kl_coef), float(s.entropy_coef),
        has_kl=int(s.kl_coef > 0), ent_bonus=int(bonus), lp_local=int(lp_local is not None), **_flags(bt, s),
        BLOCK=block, num_warps=WARPS)
    return glp, gent


def metrics_dict(out: torch.Tensor, s, has_entropy: bool) -> dict:
    """The metrics `megaapo.algos.losses.policy_loss` reports, as 0-d views of the kernel's output vector."""
    out = out.detach()
    m = {"pg_loss": out[1], "clip_frac": out[2]}
    if s.kl_coef > 0:
        m["kl"], m["kl_loss"] = out[3], out[4]
    if has_entropy:
        m["entropy"] = out[5]
    return m


# ------------------------------------------------------------------------------------------------ autograd
class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, entropy, bt: _Batch, s, num_tokens, num_seqs):
        coef, out, loss = seq_coefficients(bt, s, num_tokens, num_seqs, with_lp=True)
        ctx.bt, ctx.s = bt, s
        ctx.save_for_backward(coef)
        ctx.mark_non_differentiable(out)
        return loss, out

    @staticmethod
    def backward(ctx, g_loss, _g_out):
        (coef,) = ctx.saved_tensors
        bt = ctx.bt
        n = bt.mask.numel()
        g = g_loss.reshape(1).float().contiguous()
        glp, gent = token_grads(bt, ctx.s, coef, g, 0, n)
        # without an entropy bonus the entropy only enters the metrics: None (a zero gradient, and no fill launch,
        # as in the PyTorch path, where it never reaches the graph)
        gent = None if gent is None else gent.view(bt.lp_shape)
        return glp.view(bt.lp_shape), gent, None, None, None, None


# ------------------------------------------------------------------------------------------------ public API
def policy_loss(logp, logp_old, advantages, mask, s, *, logp_ref=None, kl_weight=None, tis_weight=None,
                entropy=None, num_tokens: Optional[float] = None, num_seqs: Optional[float] = None,
                seq_index: Optional[torch.Tensor] = None):
    """Aggregated policy-gradient loss + kl_coef * weighted KL - entropy_coef * entropy -> (loss, metrics).

    Same contract as `megaapo.algos.losses.policy_loss`: logp, logp_old, logp_ref, mask, tis_weight, entropy [B, T];
    advantages [B] (or [B, T]), kl_weight [B]. Packed: token tensors [N] with seq_index [N] in [0, S) and
    advantages, kl_weight [S]. Gradients flow to logp and entropy; the other inputs are treated as constants.
    metrics: detached 0-d tensors pg_loss, clip_frac (+ kl, kl_loss when kl_coef > 0, entropy when given).
    CPU tensors without TRITON_INTERPRET=1 run `policy_loss_reference`.
    """
    if s.kl_coef > 0 and logp_ref is None:
        raise ValueError("kl_coef > 0 needs the reference log-probs (logp_ref)")
    if not use_triton(logp):
        return policy_loss_reference(logp, logp_old, advantages, mask, s, logp_ref=logp_ref, kl_weight=kl_weight,
                                     tis_weight=tis_weight, entropy=entropy, num_tokens=num_tokens,
                                     num_seqs=num_seqs, seq_index=seq_index)
    _cfg(s)
    bt = flatten_batch(logp.detach(), logp_old, advantages, mask, seq_index=seq_index,
                       logp_ref=logp_ref if s.kl_coef > 0 else None, kl_weight=kl_weight, tis_weight=tis_weight,
                       entropy=None if entropy is None else entropy.detach())
    bt.lp_shape = logp.shape
    loss, out = _PolicyLoss.apply(logp, entropy, bt, s, num_tokens, num_seqs)
    return loss, metrics_dict(out, s, entropy is not None)


# ------------------------------------------------------------------------------------------------- reference
def _kl(name, logp, logp_ref):
    d = logp - logp_ref
    if name == "k1":
        return d
    if name == "k2":
        return 0.5 * d * d
    return torch.exp(-d) + d - 1


def _coef_reference(mode, n_s, n_tok_total, num_tokens, num_seqs, norm_len):
    """Per-sequence aggregation weight [S]: loss = sum over tokens of mask * value * weight[seq]."""
    one = torch.ones_like(n_s)
    if mode == "token_mean":
        return one / (n_tok_total.clamp(min=1) if num_tokens is None else max(float(num_tokens), 1.0))
    if mode == "seq_mean_token_mean":
        den = (n_s > 0).sum().to(n_s.dtype).clamp(min=1) if num_seqs is None else max(float(num_seqs), 1.0)
        return one / (n_s.clamp(min=1) * den)
    if not norm_len:
        raise ValueError("seq_sum_norm needs norm_len (the constant; Dr.GRPO uses the max generation length)")
    den = float(n_s.numel() if num_seqs is None else num_seqs)
    return one / (max(den, 1.0) * norm_len)


def policy_loss_reference(logp, logp_old, advantages, mask, s, *, logp_ref=None, kl_weight=None, tis_weight=None,
                          entropy=None, num_tokens=None, num_seqs=None, seq_index=None):
    """Pure-PyTorch `policy_loss` (same arguments and outputs), written per token + per-sequence weights."""
    if s.kl_coef > 0 and logp_ref is None:
        raise ValueError("kl_coef > 0 needs the reference log-probs (logp_ref)")
    _cfg(s)
    dt = logp.dtype
    if seq_index is None:
        b, t = logp.shape
        seq = torch.arange(b, device=logp.device).repeat_interleave(t)
        n_seq = b
    else:
        seq, n_seq = seq_index.reshape(-1).long(), advantages.shape[0]
    flat = lambda x: None if x is None else x.reshape(-1)  # noqa: E731
    lp, old, m = flat(logp), flat(logp_old).to(dt), flat(mask).to(dt)
    adv = flat(advantages).to(dt) if advantages.dim() == 2 else advantages.to(dt)[seq]
    on = m != 0
    n_s = torch.zeros(n_seq, dtype=dt, device=lp.device).index_add_(0, seq, m)
    coefs = lambda mode: _coef_reference(mode, n_s, m.sum(), num_tokens, num_seqs, s.loss_agg_norm_len)[seq]  # noqa
    ratio = torch.exp(lp - old)
    if s.policy_loss == "ppo_clip":
        u, c = ratio * adv, torch.clamp(ratio, 1 - s.clip_eps_low, 1 + s.clip_eps_high) * adv
        pg, clipped = -torch.minimum(u, c), c < u
    else:
        pg, clipped = -ratio * adv, torch.zeros_like(on)
    if tis_weight is not None:
        pg = pg * flat(tis_weight).to(dt)
    c_loss = coefs(s.loss_agg)
    loss = torch.where(on, pg * m * c_loss, 0).sum()
    n_valid = m.sum().clamp(min=1)
    metrics = {"pg_loss": loss.detach(), "clip_frac": (torch.where(on & clipped, m, 0).sum() / n_valid).detach()}
    if s.kl_coef > 0:
        kl = _kl(s.kl_estimator, lp, flat(logp_ref).to(dt))
        w = kl_weight.to(dt)[seq] if kl_weight is not None else torch.ones_like(kl)
        kl_term = torch.where(on, kl * w * m * coefs(s.kl_agg), 0).sum()
        loss = loss + s.kl_coef * kl_term
        metrics["kl"] = (torch.where(on, kl * m, 0).sum() / n_valid).detach()
        metrics["kl_loss"] = kl_term.detach()
    if entropy is not None:
        ent = torch.where(on, flat(entropy) * m * c_loss, 0).sum()
        metrics["entropy"] = ent.detach()
        if s.entropy_coef > 0:
            loss = loss - s.entropy_coef * ent
    return loss, metrics
