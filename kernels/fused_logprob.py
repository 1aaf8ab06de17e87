"""Fused per-token log p(target) (and entropy) from final hidden states and the lm_head weight.

Called by the learner for the old-policy and reference passes (forward only) and, through
`kernels.fused_policy_loss`, for the training pass. Public API: `fused_logprob` (autograd-aware) and
`fused_logprob_reference` (pure PyTorch: the CPU fallback, the tests' oracle and the benchmark's baseline).

What is fused. hidden [N, H] and weight [V, H] never produce an [N, V] logits tensor. Rows are processed in chunks;
per chunk a cuBLAS GEMM writes the chunk's logits into a bounded workspace (in the inputs' dtype, so bf16 inputs
give bf16-rounded logits exactly like eager PyTorch and vLLM), and one Triton row kernel keeps fp32 running max /
sum-exp / sum p*z / target logit over vocab tiles (online logsumexp) and writes fp32 log-probs, entropy and the
per-row lse. Forward-only passes also split the vocabulary into chunks (`workspace_bytes`, default 256 MiB), so the
workspace stays bounded for any N; gradient passes take whole-vocabulary chunks of `grad_chunk_rows` rows (4096 for
an fp32 main_grad: 1.16 GiB of bf16 logits at V=152k), sized so that re-reading and re-writing dW once per chunk
stays under a tenth of the chunk's GEMM time. Under tensor parallelism each rank holds a vocab shard [V/tp, H] starting at
`vocab_start`; per chunk the row maxima are all-reduced (MAX) and the rescaled (sum-exp, sum p*z, target logit)
(SUM): two small collectives of O(rows) floats.

Backward (and the gradient-in-forward path of `fused_policy_loss`): per row chunk the logits are recomputed (not
when the gradient is made during the forward), a second row kernel overwrites them in place with
dZ = (a * onehot - p * (a + b * (z - E_p[z]))) / T, where a and b are the per-token gradients of the loss with
respect to log p and entropy, and two cuBLAS GEMMs give dX = dZ W and dW += dZ^T X. dW goes to a weight-dtype
tensor (accumulated across chunks in that dtype, as Liger does) or, when the caller passes `main_grad`, is added in
fp32 to that buffer (Megatron's gradient-accumulation fusion).

Memory traffic that remains: each chunk's logits are written once by the GEMM and read by the row kernel (twice
more, read + write, when a gradient is made), X and W are read by the GEMMs, and the outputs are O(N) floats plus
dX [N, H] and dW [V, H]. FLOPs: 2NHV forward, 8NHV forward + recompute backward, 6NHV with the gradient in the
forward (`fused_policy_loss`).

Fallback: on CPU tensors without TRITON_INTERPRET=1 `fused_logprob` runs `fused_logprob_reference`. A torch without
the fp32-output GEMM (torch.addmm(out_dtype=), < 2.10) upcasts the dW operands to fp32, with a one-time warning.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels._common import next_pow2, on_gpu, round_to, use_triton


# ---------------------------------------------------------------------------------------------------- kernels
# What Triton compiles a kernel for: the pointer dtypes and the constexprs below, nothing else. Integer sizes are
# not specialised (by default a size equal to 1, or a multiple of 16, compiles a kernel of its own), so a new batch
# shape never costs a compile in the middle of a run and `kernels.compile_check` can compile every variant ahead of
# time; ROW_ALIGNED carries the one size fact worth a variant (16-element rows: 16-byte loads). Per-row pointers
# are read one element per program, so their alignment is not specialised either.
_ROW_INTS = ["stride_z", "n_rows", "n_cols", "col_start", "accum", "finalize"]
_ROW_PTRS = ["tgt_ptr", "m_ptr", "s_ptr", "t_ptr", "zt_ptr", "lse_ptr", "ez_ptr", "logp_ptr", "ent_ptr"]


@triton.jit(do_not_specialize=_ROW_INTS, do_not_specialize_on_alignment=_ROW_PTRS)
def _row_stats_kernel(z_ptr, stride_z, n_rows, n_cols, col_start, tgt_ptr, inv_t,
                      m_ptr, s_ptr, t_ptr, zt_ptr, lse_ptr, ez_ptr, logp_ptr, ent_ptr, accum, finalize,
                      WANT_ENT: tl.constexpr, ROW_ALIGNED: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    # accum: the running statistics of earlier vocab chunks are loaded (else started); finalize: this chunk ends
    # the row, so log-probs are written (else the statistics are stored for the next chunk or the TP merge).
    if ROW_ALIGNED:
        # the launcher guarantees 16 | n_cols == stride_z; the product lets Triton's alignment analysis see it
        stride_z = (stride_z // 16) * 16
        n_cols = (n_cols // 16) * 16
    # Rows on grid axis 0 (2^31 programs) so no token count hits the 65,535 limit of axes 1 and 2.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1).to(tl.int64) - col_start
    if accum != 0:
        m = tl.load(m_ptr + rows, mask=rmask, other=float("-inf"))
        s = tl.load(s_ptr + rows, mask=rmask, other=0.0)
        t = tl.load(t_ptr + rows, mask=rmask, other=0.0)
        zt = tl.load(zt_ptr + rows, mask=rmask, other=0.0)
    else:
        # -inf, never 0, as the max identity: a 0 start makes all-negative rows give positive log-probs.
        m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_R,), tl.float32)
        t = tl.zeros((BLOCK_R,), tl.float32)
        zt = tl.zeros((BLOCK_R,), tl.float32)
    base = z_ptr + rows.to(tl.int64)[:, None] * stride_z
    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        cmask = cols < n_cols
        valid = rmask[:, None] & cmask[None, :]
        z = tl.load(base + cols[None, :], mask=valid, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # Padding rows stay at -inf; a finite stand-in keeps inf - inf (NaN) out of the arithmetic.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        e = tl.exp(z - m_ref[:, None])
        if WANT_ENT:
            # t = sum e^(z-m) (z-m) is kept relative to the running max; moving the max rescales it and shifts it
            # by s * (m_old - m_new). The where() keeps 0 * (-inf) out of both terms (masked columns, first tile).
            shift = tl.where(m == float("-inf"), 0.0, m - m_ref)
            t = alpha * (t + s * shift) + tl.sum(tl.where(valid, e * (z - m_ref[:, None]), 0.0), axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        hit = (cols[None, :] == tgt[:, None]) & valid
        zt += tl.sum(tl.where(hit, z, 0.0), axis=1)
        m = m_new
    if finalize != 0:
        log_s = tl.log(s)
        lse = m + log_s
        tl.store(lse_ptr + rows, lse, mask=rmask)
        tl.store(logp_ptr + rows, zt - lse, mask=rmask)
        if WANT_ENT:
            tl.store(ez_ptr + rows, m + t / s, mask=rmask)
            tl.store(ent_ptr + rows, log_s - t / s, mask=rmask)
    else:
        tl.store(m_ptr + rows, m, mask=rmask)
        tl.store(s_ptr + rows, s, mask=rmask)
        tl.store(t_ptr + rows, t, mask=rmask)
        tl.store(zt_ptr + rows, zt, mask=rmask)


@triton.jit(do_not_specialize=["stride_z", "stride_dz", "n_rows", "n_cols", "col_start"],
            do_not_specialize_on_alignment=["tgt_ptr", "lse_ptr", "ez_ptr", "a_ptr", "b_ptr"])
def _row_grad_kernel(z_ptr, stride_z, dz_ptr, stride_dz, n_rows, n_cols, col_start, tgt_ptr, inv_t,
                     lse_ptr, ez_ptr, a_ptr, b_ptr,
                     HAS_B: tl.constexpr, ROW_ALIGNED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    if ROW_ALIGNED:   # as in _row_stats_kernel: 16 | n_cols == stride_z == stride_dz
        stride_z = (stride_z // 16) * 16
        stride_dz = (stride_dz // 16) * 16
        n_cols = (n_cols // 16) * 16
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1).to(tl.int64) - col_start
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    a = tl.load(a_ptr + rows, mask=rmask, other=0.0)
    if HAS_B:
        b = tl.load(b_ptr + rows, mask=rmask, other=0.0)
        ez = tl.load(ez_ptr + rows, mask=rmask, other=0.0)
    zbase = z_ptr + rows.to(tl.int64)[:, None] * stride_z
    dbase = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz
    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        valid = rmask[:, None] & (cols < n_cols)[None, :]
        z = tl.load(zbase + cols[None, :], mask=valid, other=0.0).to(tl.float32) * inv_t
        p = tl.exp(z - lse[:, None])
        if HAS_B:
            # dH/dz = -p (z - E_p[z]): the p log p form would give 0 * (-inf) = NaN where p underflows.
            dz = -p * (a[:, None] + b[:, None] * (z - ez[:, None]))
        else:
            dz = -p * a[:, None]
        dz = tl.where(cols[None, :] == tgt[:, None], dz + a[:, None], dz) * inv_t
        # Each element is read and then written by the same program, so dz_ptr may alias z_ptr (in place).
        tl.store(dbase + cols[None, :], round_to(dz, dz_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------------------------------- launcher
DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # hidden / weight dtypes the kernels are compiled for

# Gradient chunk size. A gradient pass adds each row chunk's dW = dZ^T X into dW [V, H] (megatron's fp32 main_grad,
# or a weight-dtype tensor), so cuBLAS reads and writes all of dW once per chunk: 2 V H e bytes (e = dW's element
# size) against the 6 C H V FLOPs of the chunk's three GEMMs. Their time ratio, e R / (3 C B), depends on the chunk
# rows C alone; C is the smallest power of two that keeps it under DW_TRAFFIC_SHARE on an H100 (docs/kernels.md
# works it through for the ANCHORS shapes). R and B are measured H100 rates (../shared/ANCHORS.md).
MATMUL_FLOPS = 735e12      # bf16 cuBLAS, the three lm_head GEMMs at 3B N=8192: 6 N H V / 20.8 ms
HBM_BYTES = 3.0e12         # device-memory copy rate, bytes read + written
DW_TRAFFIC_SHARE = 0.10


def grad_chunk_rows(dw_elem: int) -> int:
    """Rows per gradient chunk for a dW of `dw_elem`-byte elements: 4096 for fp32 main_grad, 2048 for bf16 dW."""
    return next_pow2(math.ceil(dw_elem * MATMUL_FLOPS / (3 * DW_TRAFFIC_SHARE * HBM_BYTES)))


@dataclass(frozen=True)
class LaunchConfig:
    """Chunk and block sizes; None picks the default for the device. Tests shrink them to hit block boundaries.

    Only the defaults are compiled ahead of time by `kernels.compile_check`; other block sizes compile on first use.
    """
    workspace_bytes: int = 256 << 20     # logits workspace of forward-only passes (gradient chunks: grad_chunk_rows)
    chunk_rows: Optional[int] = None     # rows per GEMM chunk
    chunk_vocab: Optional[int] = None    # vocab columns per GEMM chunk (forward-only passes)
    block_rows: Optional[int] = None     # rows per row-kernel program
    block_vocab: Optional[int] = None    # vocab tile of the row kernels
    num_warps: Optional[int] = None


def _blocks(cfg: LaunchConfig, rows: int, cols: int, device: torch.device):
    if on_gpu(device):   # fixed, whatever the shape: one compiled kernel per dtype and flag set
        br = cfg.block_rows or 1
        bv = cfg.block_vocab or 4096
        warps = cfg.num_warps or (8 if bv >= 2048 else 4)
    else:   # the interpreter runs each program in Python, so fewer, fatter programs are much faster
        br = cfg.block_rows or min(64, next_pow2(rows))
        bv = cfg.block_vocab or min(256, next_pow2(cols))
        warps = 1
    return br, bv, warps


def _chunks(cfg: LaunchConfig, n: int, v: int, elem: int, dw_elem: Optional[int]):
    """(rows, cols) of a GEMM chunk whose logits take `elem` bytes per element. dw_elem: a gradient pass, whose dW
    has elements of that size (rows from grad_chunk_rows); None: forward only (logits within workspace_bytes)."""
    if dw_elem is not None:   # dZ needs the full-vocab lse before it can be written, so a chunk spans the whole shard
        target = cfg.chunk_rows or grad_chunk_rows(dw_elem)
        parts = triton.cdiv(n, target)      # as many chunks as the target needs, evened out: less workspace
        rows = target if cfg.chunk_rows else triton.cdiv(triton.cdiv(n, parts), 64) * 64
        cols = v
    else:                     # forward only: tall chunks keep the GEMM efficient, the vocab split bounds the workspace
        rows = cfg.chunk_rows or 4096
        # a multiple of 256, so that every vocab chunk but the last has 16-aligned rows (vectorised row kernels)
        cols = cfg.chunk_vocab or max(256, cfg.workspace_bytes // elem // min(rows, n) // 256 * 256)
    return max(1, min(rows, n)), max(1, min(cols, v))


_FP32_OUT: dict = {}   # (device type, operand dtype) -> None when the fp32-output GEMM runs, else why not


def fp32_output_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether cuBLAS's fp32-output GEMM from `dtype` operands (torch.mm / torch.addmm with out_dtype=, torch >= 2.8;
    addmm with an fp32 input since 2.10) runs on `device`, probed once on a 2 x 2 product. Without it the callers
    upcast both operands to fp32 (an fp32 GEMM: ~10x slower than bf16 on tensor cores) and this warns once, naming
    the cause. CPU tensors (the interpreter tests) always upcast: there is no such CPU kernel and no speed to lose."""
    if device.type != "cuda":
        return False
    key = (device.type, dtype)
    if key not in _FP32_OUT:
        a = torch.zeros(2, 2, dtype=dtype, device=device)
        c = torch.zeros(2, 2, dtype=torch.float32, device=device)
        try:
            torch.mm(a, a, out_dtype=torch.float32, out=c)
            torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
            _FP32_OUT[key] = None
        except (TypeError, RuntimeError) as e:   # no such overload (torch < 2.8) or no kernel for these dtypes
            _FP32_OUT[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            warnings.warn(f"fused_logprob: torch {torch.__version__} has no fp32-output GEMM for {dtype} operands "
                          f"on {device.type} (torch.addmm(..., out_dtype=torch.float32) failed with "
                          f"{_FP32_OUT[key]}); the lm_head weight gradient into an fp32 main_grad (and fp32 logits) "
                          f"now upcast both operands and run an fp32 matmul, about 10x slower. Use torch >= 2.10.",
                          RuntimeWarning, stacklevel=3)
    return _FP32_OUT[key] is None


def _accumulate_wgrad(dw: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, first: bool) -> None:
    """dw (+)= dz^T h. An fp32 dw with 16-bit operands takes cuBLAS's fp32-output GEMM (no fp32 operand copies)."""
    beta = 0 if first else 1
    if dw.dtype == dz.dtype:
        if first:
            torch.mm(dz.t(), h, out=dw)
        else:
            dw.addmm_(dz.t(), h)
    elif fp32_output_gemm(dw.device, dz.dtype):
        torch.addmm(dw, dz.t(), h, beta=beta, out_dtype=dw.dtype, out=dw)
    else:
        dw.addmm_(dz.t().to(dw.dtype), h.to(dw.dtype), beta=beta)


def _mm_into(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """z = a @ b, z possibly wider than the operands (fp32 logits from bf16 inputs, fp32 cuBLAS accumulation)."""
    if z.dtype == a.dtype:
        torch.mm(a, b, out=z)
    elif fp32_output_gemm(z.device, a.dtype):
        torch.mm(a, b, out_dtype=z.dtype, out=z)
    else:
        torch.mm(a.to(z.dtype), b.to(z.dtype), out=z)


def _tp_merge(m, s, t, zt, group, want_ent):
    """Merge the per-rank vocab-shard statistics of one row chunk -> (lse, logp, ez, ent) of the full vocab."""
    gmax = m.clone()
    dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
    scale = torch.exp(m - gmax)
    parts = [s * scale, zt] + ([scale * (t + s * (m - gmax))] if want_ent else [])
    packed = torch.stack(parts)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    log_s = packed[0].log()
    lse = gmax + log_s
    logp = packed[1] - lse
    if not want_ent:
        return lse, logp, None, None
    t_over_s = packed[2] / packed[0]
    return lse, logp, gmax + t_over_s, log_s - t_over_s


@dataclass
class GradSpec:
    """How a pass makes gradients. coef(r0, r1, logp_chunk, ent_chunk) -> (a, b|None): per-token dL/dlogp and
    dL/dentropy for rows r0:r1 (fp32, contiguous). dx [N, H] receives dX; dw [V, H] (weight dtype or fp32
    main_grad) receives dW, added to its content when `accumulate` (main_grad) else overwritten."""
    coef: Callable
    dx: torch.Tensor
    dw: Optional[torch.Tensor]
    accumulate: bool
    use_saved: bool = False            # backward: lse / ez come from the forward, no statistics pass
    reduce_dx: bool = True             # all-reduce dX over the TP group (off when the caller's layer does it)


def lm_head_pass(hidden, weight, targets, temperature, vocab_start, tp_group, want_ent, cfg: LaunchConfig,
                 grad: Optional[GradSpec] = None, saved=None, logits_dtype: Optional[torch.dtype] = None):
    """One chunked pass over the rows: statistics (and, with `grad`, dZ, dX, dW). Returns (logp, ent, lse, ez).

    With grad.use_saved the statistics are taken from `saved` = (lse, ez) and no log-probs are produced.
    logits_dtype: dtype of the logits workspace (None: the inputs' dtype, i.e. eager/vLLM rounding).
    """
    n, _ = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    tp = tp_group is not None and dist.get_world_size(tp_group) > 1
    f32 = dict(dtype=torch.float32, device=dev)
    if grad is not None and grad.use_saved:
        lse, ez = saved
        logp = ent = None
    else:
        logp, lse = torch.empty(n, **f32), torch.empty(n, **f32)
        ent = torch.empty(n, **f32) if want_ent else None
        ez = torch.empty(n, **f32) if want_ent else None
    zdt = logits_dtype or hidden.dtype
    split = grad is not None and zdt != weight.dtype     # dZ must be in the weight dtype for the dX / dW GEMMs
    elem = torch.empty(0, dtype=zdt).element_size() + (weight.element_size() if split else 0)
    dw_elem = None if grad is None else (grad.dw if grad.dw is not None else weight).element_size()
    rows, cols = _chunks(cfg, n, v, elem, dw_elem)
    ws = torch.empty(rows * cols, dtype=zdt, device=dev)
    dz_ws = torch.empty(rows * cols, dtype=weight.dtype, device=dev) if split else None
    br, bv, warps = _blocks(cfg, rows, cols, dev)
    run = torch.empty(4, rows, **f32)       # running (max, sum-exp, sum p*z, target logit) across vocab chunks
    blocks = dict(BLOCK_R=br, BLOCK_V=bv, num_warps=warps)
    outs = (logp, ent, lse, ez)
    first_w = True
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h, tg = hidden[r0:r1], targets[r0:r1]
        if not (grad is not None and grad.use_saved):
            _row_chunk_stats(h, weight, tg, r0, r1, ws, run, outs, cols, vocab_start, temperature, tp_group, tp,
                             want_ent, blocks)
        if grad is None:
            continue
        nr = r1 - r0
        z = ws[: nr * v].view(nr, v)
        if grad.use_saved:
            _mm_into(z, h, weight.t())
        a, b = grad.coef(r0, r1, None if logp is None else logp[r0:r1], None if ent is None else ent[r0:r1])
        has_b = b is not None
        dz = dz_ws[: nr * v].view(nr, v) if split else z
        dummy = run[0]
        _row_grad_kernel[(triton.cdiv(nr, br),)](
            z, z.stride(0), dz, dz.stride(0), nr, v, vocab_start, tg, 1.0 / float(temperature),
            lse[r0:r1], ez[r0:r1] if has_b else dummy, a, b if has_b else dummy,
            HAS_B=has_b, ROW_ALIGNED=v % 16 == 0, **blocks)
        if grad.dx is not None:
            torch.mm(dz, weight, out=grad.dx[r0:r1])
        if grad.dw is not None:
            _accumulate_wgrad(grad.dw, dz, h, first=first_w and not grad.accumulate)
            first_w = False
    if grad is not None and tp and grad.dx is not None and grad.reduce_dx:
        dist.all_reduce(grad.dx, op=dist.ReduceOp.SUM, group=tp_group)
    return logp, ent, lse, ez


def _row_chunk_stats(h, weight, tg, r0, r1, ws, run, outs, cols, vocab_start, temperature, tp_group, tp, want_ent,
                     blocks):
    """Statistics of rows r0:r1 over the vocab chunks of this shard (merged over the TP group): fills outs' rows."""
    logp, ent, lse, ez = outs
    nr, v = r1 - r0, weight.shape[0]
    dummy = run[0]
    for c0 in range(0, v, cols):
        c1 = min(v, c0 + cols)
        z = ws[: nr * (c1 - c0)].view(nr, c1 - c0)
        _mm_into(z, h, weight[c0:c1].t())
        _row_stats_kernel[(triton.cdiv(nr, blocks["BLOCK_R"]),)](
            z, z.stride(0), nr, c1 - c0, vocab_start + c0, tg, 1.0 / float(temperature),
            run[0], run[1], run[2], run[3],
            lse[r0:r1], ez[r0:r1] if want_ent else dummy, logp[r0:r1], ent[r0:r1] if want_ent else dummy,
            int(c0 > 0), int(c1 == v and not tp), WANT_ENT=want_ent, ROW_ALIGNED=(c1 - c0) % 16 == 0, **blocks)
    if tp:
        out = _tp_merge(run[0, :nr], run[1, :nr], run[2, :nr], run[3, :nr], tp_group, want_ent)
        lse[r0:r1], logp[r0:r1] = out[0], out[1]
        if want_ent:
            ez[r0:r1], ent[r0:r1] = out[2], out[3]


def check_inputs(hidden, weight, targets, main_grad=None):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_logprob: hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fused_logprob: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"fused_logprob: targets must be [N]={hidden.shape[0]}, got {tuple(targets.shape)}")
    if main_grad is not None and (main_grad.shape != weight.shape or main_grad.dtype != torch.float32):
        raise ValueError("fused_logprob: main_grad must be an fp32 tensor shaped like weight")


def kernel_inputs(hidden, targets, logits_dtype):
    """The Triton path's inputs in the dtypes its kernels are compiled for (DTYPES; int64 targets; fp32 or the
    inputs' dtype for the logits) -> (targets, logits_dtype); a clear error for anything else."""
    if hidden.dtype not in DTYPES:
        raise ValueError(f"fused_logprob: the kernels take {', '.join(map(str, DTYPES))} hidden states and weights, "
                         f"got {hidden.dtype}; cast the model, or use fused_logprob_reference")
    if logits_dtype not in (None, hidden.dtype, torch.float32):
        raise ValueError(f"fused_logprob: logits_dtype must be None (the inputs' dtype) or torch.float32, "
                         f"got {logits_dtype}")
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"fused_logprob: targets must be integer token ids, got {targets.dtype}")
    return targets.long(), None if logits_dtype == hidden.dtype else logits_dtype


# ------------------------------------------------------------------------------------------------ autograd
class _FusedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, want_ent, tp_group, vocab_start, main_grad,
                reduce_grad_hidden, cfg, logits_dtype):
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
        logp, ent, lse, ez = lm_head_pass(hidden, weight, targets, temperature, vocab_start, tp_group, want_ent, cfg,
                                          logits_dtype=logits_dtype)
        ctx.save_for_backward(hidden, weight, targets, lse, ez if want_ent else None)
        ctx.args = (temperature, want_ent, tp_group, vocab_start, main_grad, reduce_grad_hidden, cfg, logits_dtype)
        if want_ent:
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, targets, lse, ez = ctx.saved_tensors
        temperature, want_ent, tp_group, vocab_start, main_grad, reduce_grad_hidden, cfg, logits_dtype = ctx.args
        n = hidden.shape[0]
        zeros = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        a = zeros if g_logp is None else g_logp.float().contiguous()
        b = None if (not want_ent or g_ent is None) else g_ent.float().contiguous()
        need_w = ctx.needs_input_grad[1] or main_grad is not None
        dw = main_grad if main_grad is not None else (torch.empty_like(weight) if need_w else None)
        spec = GradSpec(coef=lambda r0, r1, *_: (a[r0:r1], None if b is None else b[r0:r1]),
                        dx=torch.empty_like(hidden) if ctx.needs_input_grad[0] else None, dw=dw,
                        accumulate=main_grad is not None, use_saved=True, reduce_dx=reduce_grad_hidden)
        lm_head_pass(hidden, weight, targets, temperature, vocab_start, tp_group, want_ent, cfg, grad=spec,
                     saved=(lse, ez if b is not None else None), logits_dtype=logits_dtype)
        gw = None if main_grad is not None or not ctx.needs_input_grad[1] else dw
        return spec.dx, gw, None, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------ public API
def fused_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
                  return_entropy: bool = False, tp_group=None, vocab_start: Optional[int] = None,
                  main_grad: Optional[torch.Tensor] = None, reduce_grad_hidden: bool = True,
                  logits_dtype: Optional[torch.dtype] = None, config: Optional[LaunchConfig] = None):
    """log softmax(hidden @ weight^T / temperature)[target] per row, without materialising the logits.

    hidden [N, H], weight [V_local, H] (same dtype), targets [N] int (global vocab ids) -> (logp [N] fp32,
    entropy [N] fp32 or None unless return_entropy). Differentiable in hidden and weight (the backward recomputes
    the logits chunk by chunk). tp_group: vocab-parallel group (None: no TP); this rank's shard starts at
    vocab_start, by default rank * V_local (Megatron's equal shards; pass it for any other layout).
    Under TP the hidden-state gradient is all-reduced over tp_group unless reduce_grad_hidden=False (set that when
    the caller's own layer, e.g. Megatron's copy-to-TP-region, already does it). main_grad: an fp32 [V_local, H]
    buffer; the weight gradient is added to it in fp32 and weight.grad stays None. CPU tensors without
    TRITON_INTERPRET=1 run `fused_logprob_reference` (same semantics).
    logits_dtype: precision the logits are rounded to before the fp32 statistics. None = the inputs' dtype: bf16
    inputs give bf16 logits, bit-compatible with eager `(h @ W.T).float()` and vLLM; torch.float32 keeps fp32
    logits (more accurate, 3x the workspace per row when a gradient is made).
    """
    check_inputs(hidden, weight, targets, main_grad)
    vocab_start = default_vocab_start(weight, tp_group, vocab_start)
    if not use_triton(hidden):
        return fused_logprob_reference(hidden, weight, targets, temperature, return_entropy=return_entropy,
                                       tp_group=tp_group, vocab_start=vocab_start, main_grad=main_grad,
                                       reduce_grad_hidden=reduce_grad_hidden, logits_dtype=logits_dtype)
    targets, logits_dtype = kernel_inputs(hidden, targets, logits_dtype)
    out = _FusedLogprob.apply(hidden, weight, targets, float(temperature), return_entropy, tp_group, vocab_start,
                              main_grad, reduce_grad_hidden, config or LaunchConfig(), logits_dtype)
    return out if return_entropy else (out, None)


def default_vocab_start(weight, tp_group, vocab_start: Optional[int]) -> int:
    if vocab_start is not None:
        return int(vocab_start)
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return 0
    return dist.get_rank(tp_group) * weight.shape[0]


# ------------------------------------------------------------------------------------------------- reference
class _GatherVocab(torch.autograd.Function):
    """All-gather vocab shards along the last dim; backward keeps this rank's slice (every rank computes the same
    replicated loss, so the gradient of a shard is its slice, not a sum over ranks)."""

    @staticmethod
    def forward(ctx, local, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        sizes = torch.tensor([local.shape[-1]], device=local.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes, group=group)
        all_sizes = [int(x) for x in all_sizes]
        width = max(all_sizes)
        pad = torch.full((*local.shape[:-1], width), float("-inf"), dtype=local.dtype, device=local.device)
        pad[..., : local.shape[-1]] = local
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad.contiguous(), group=group)
        ctx.offset, ctx.width = sum(all_sizes[:rank]), local.shape[-1]
        return torch.cat([p[..., :w] for p, w in zip(parts, all_sizes)], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.offset: ctx.offset + ctx.width].contiguous(), None


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (vocab-parallel hidden-state gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _IntoMainGrad(torch.autograd.Function):
    """Identity forward; backward adds the gradient to an fp32 main_grad buffer and gives the weight none."""

    @staticmethod
    def forward(ctx, w, main_grad):
        ctx.main_grad = main_grad
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        ctx.main_grad.add_(grad.to(torch.float32))
        return None, None


def fused_logprob_reference(hidden, weight, targets, temperature: float = 1.0, *, return_entropy: bool = False,
                            tp_group=None, vocab_start: Optional[int] = None,
                            main_grad: Optional[torch.Tensor] = None,
                            reduce_grad_hidden: bool = True, logits_dtype: Optional[torch.dtype] = None):
    """Pure-PyTorch `fused_logprob`: materialises the logits, rounds them to `logits_dtype` (default: the inputs'
    dtype) and does the rest in fp32 (fp64 for fp64 inputs); same arguments."""
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    tp = tp_group is not None and dist.get_world_size(tp_group) > 1
    vocab_start = default_vocab_start(weight, tp_group, vocab_start)
    if main_grad is not None:
        weight = _IntoMainGrad.apply(weight, main_grad)
    if tp and reduce_grad_hidden:
        hidden = _AllReduceGrad.apply(hidden, tp_group)
    logits = hidden.to(cd) @ weight.to(cd).t()
    rdt = logits_dtype or hidden.dtype
    if torch.finfo(rdt).bits < torch.finfo(cd).bits:
        logits = logits.to(rdt).to(cd)
    logits = logits / temperature
    if tp:
        logits = _GatherVocab.apply(logits, tp_group)
    else:
        targets = targets - vocab_start
    lse = torch.logsumexp(logits, dim=-1)
    logp = (logits.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - lse).float()
    if not return_entropy:
        return logp, None
    p = torch.softmax(logits, dim=-1)
    return logp, (lse - (p * logits).sum(-1)).float()
