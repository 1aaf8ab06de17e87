"""The RL training loss straight from hidden states: fused log-prob pass + policy loss, gradient made in the forward.

Called by the learner's training step (packed micro-batches). Public API: `fused_policy_loss` and
`fused_policy_loss_reference` (= `fused_logprob_reference` followed by `policy_loss_reference`).

What is fused. The per-sequence aggregation weights depend only on the mask (token counts), so they are computed
first (one small launch of `kernels.policy_loss`). Then one chunked pass of `kernels.fused_logprob` computes, per
row chunk, the logits (cuBLAS), the fp32 statistics and log-probs (Triton), dL/dlogp and dL/dentropy for those
rows (the `policy_loss` gradient kernel on the chunk), dZ in place of the logits, dX = dZ W and dW += dZ^T X. No
logits are recomputed: three GEMMs per chunk, 6NHV FLOPs for forward + backward (eager's count; a recomputing
backward needs 8NHV), with a bounded workspace. A final launch of the `policy_loss` forward gives the loss value
and the metrics from the log-probs. The backward only scales the stored dX (and dW) by the upstream gradient.

Memory that remains: the logits workspace of one row chunk, dX [N, H] held from forward to backward, and dW
(weight dtype) or the caller's fp32 main_grad. With main_grad the weight gradient is added during the forward, so
the loss must be back-propagated with gradient 1 (`loss.backward()`); any other scale is checked on the device.
The stored gradients are scaled in place, so the graph supports one backward (no retain_graph re-use).

Fallback: on CPU tensors without TRITON_INTERPRET=1 `fused_policy_loss` runs `fused_policy_loss_reference`.
"""

from __future__ import annotations

from typing import Optional

import torch

from kernels._common import use_triton
from kernels.fused_logprob import (GradSpec, LaunchConfig, check_inputs, default_vocab_start, fused_logprob_reference,
                                   kernel_inputs, lm_head_pass)
from kernels.policy_loss import (_cfg, flatten_batch, metrics_dict, policy_loss_reference, seq_coefficients,
                                 token_grads)


class _FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bt, s, num_tokens, num_seqs, temperature, want_ent, tp_group,
                vocab_start, main_grad, reduce_grad_hidden, cfg, logits_dtype, on_policy):
        coef, _, _ = seq_coefficients(bt, s, num_tokens, num_seqs, with_lp=False)
        one = torch.ones(1, dtype=torch.float32, device=hidden.device)

        def coef_fn(r0, r1, lp_chunk, _ent_chunk):
            if on_policy:   # pi_old = the log-probs just computed: the chunk's ratio is exactly 1
                bt.old[r0:r1].copy_(lp_chunk)
            return token_grads(bt, s, coef, one, r0, r1, lp_local=lp_chunk, ent_bonus=want_ent)

        need_w = ctx.needs_input_grad[1] or main_grad is not None
        dw = main_grad if main_grad is not None else (torch.empty_like(weight) if need_w else None)
        dx = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        spec = GradSpec(coef=coef_fn, dx=dx, dw=dw, accumulate=main_grad is not None,
                        reduce_dx=reduce_grad_hidden)
        logp, ent, _, _ = lm_head_pass(hidden, weight, targets, temperature, vocab_start, tp_group, want_ent, cfg,
                                       grad=spec, logits_dtype=logits_dtype)
        bt.lp, bt.ent = logp, ent
        _, out, loss = seq_coefficients(bt, s, num_tokens, num_seqs, with_lp=True)
        ctx.has_main_grad = main_grad is not None
        ctx.save_for_backward(dx, None if main_grad is not None else dw)
        ctx.mark_non_differentiable(out, logp)
        return loss, out, logp

    @staticmethod
    def backward(ctx, g, _g_out, _g_logp):
        dx, dw = ctx.saved_tensors
        if ctx.has_main_grad:
            # main_grad already holds dW for an upstream gradient of exactly 1; a scaled loss would be wrong silently
            torch._assert_async((g - 1).abs() <= 1e-6, "fused_policy_loss with main_grad needs loss.backward() "
                                                      "with gradient 1 (scale the loss via num_tokens/num_seqs)")
        # in place: a scaled copy of dW would double the op's peak memory (hence a single backward per forward)
        gx = None if dx is None else dx.mul_(g.to(dx.dtype))
        gw = None if (ctx.has_main_grad or dw is None) else dw.mul_(g.to(dw.dtype))
        return gx, gw, None, None, None, None, None, None, None, None, None, None, None, None, None, None


def fused_policy_loss(hidden, weight, targets, logp_old, advantages, mask, s, *, seq_index=None, logp_ref=None,
                      kl_weight=None, tis_weight=None, num_tokens: Optional[float] = None,
                      num_seqs: Optional[float] = None, temperature: float = 1.0, with_entropy: bool = False,
                      tp_group=None, vocab_start: Optional[int] = None, main_grad: Optional[torch.Tensor] = None,
                      reduce_grad_hidden: bool = True, return_logp: bool = False,
                      logits_dtype: Optional[torch.dtype] = None, config: Optional[LaunchConfig] = None):
    """`policy_loss(fused_logprob(hidden, weight, targets), ...)` with the gradient made inside the log-prob pass.

    Packed: hidden [N, H], targets, logp_old, mask, logp_ref, tis_weight [N], seq_index [N] in [0, S),
    advantages, kl_weight [S]. Padded: hidden [B, T, H] with token tensors [B, T] and seq_index None.
    logp_old None: on-policy, pi_old is the current log-prob itself (detached; ratio 1 in value, gradient A).
    s: loss settings (megaapo's LossSettings or kernels.policy_loss.LossSettings); entropy is computed when
    with_entropy or s.entropy_coef > 0 and then enters the metrics (and the loss as a bonus). TP, main_grad,
    reduce_grad_hidden and logits_dtype as in `fused_logprob`. Returns (loss, metrics) or, with return_logp,
    (loss, metrics, logp [N] fp32 detached). Gradients flow to hidden and weight (or main_grad).
    """
    if s.kl_coef > 0 and logp_ref is None:
        raise ValueError("kl_coef > 0 needs the reference log-probs (logp_ref)")
    want_ent = with_entropy or s.entropy_coef > 0
    h2 = hidden.reshape(-1, hidden.shape[-1])
    tg = targets.reshape(-1)
    check_inputs(h2, weight, tg, main_grad)
    vocab_start = default_vocab_start(weight, tp_group, vocab_start)
    if not use_triton(hidden):
        return fused_policy_loss_reference(hidden, weight, targets, logp_old, advantages, mask, s,
                                           seq_index=seq_index, logp_ref=logp_ref, kl_weight=kl_weight,
                                           tis_weight=tis_weight, num_tokens=num_tokens, num_seqs=num_seqs,
                                           temperature=temperature, with_entropy=with_entropy, tp_group=tp_group,
                                           vocab_start=vocab_start, main_grad=main_grad,
                                           reduce_grad_hidden=reduce_grad_hidden, return_logp=return_logp,
                                           logits_dtype=logits_dtype)
    _cfg(s)
    tg, logits_dtype = kernel_inputs(h2, tg, logits_dtype)
    on_policy = logp_old is None
    if on_policy:   # filled chunk by chunk with the log-probs of the pass (the counting launch does not read it)
        logp_old = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    bt = flatten_batch(None, logp_old, advantages, mask, seq_index=seq_index,
                       logp_ref=logp_ref if s.kl_coef > 0 else None, kl_weight=kl_weight, tis_weight=tis_weight)
    loss, out, logp = _FusedPolicyLoss.apply(
        h2.contiguous(), weight.contiguous(), tg.contiguous(), bt, s, num_tokens, num_seqs, float(temperature),
        want_ent, tp_group, vocab_start, main_grad, reduce_grad_hidden, config or LaunchConfig(), logits_dtype,
        on_policy)
    metrics = metrics_dict(out, s, want_ent)
    return (loss, metrics, logp) if return_logp else (loss, metrics)


def fused_policy_loss_reference(hidden, weight, targets, logp_old, advantages, mask, s, *, seq_index=None,
                                logp_ref=None, kl_weight=None, tis_weight=None, num_tokens=None, num_seqs=None,
                                temperature: float = 1.0, with_entropy: bool = False, tp_group=None,
                                vocab_start=None, main_grad=None, reduce_grad_hidden: bool = True,
                                return_logp: bool = False, logits_dtype=None):
    """Pure PyTorch: `fused_logprob_reference` then `policy_loss_reference` (same arguments as the fused op)."""
    want_ent = with_entropy or s.entropy_coef > 0
    h2 = hidden.reshape(-1, hidden.shape[-1])
    logp, ent = fused_logprob_reference(h2, weight, targets.reshape(-1), temperature, return_entropy=want_ent,
                                        tp_group=tp_group, vocab_start=vocab_start, main_grad=main_grad,
                                        reduce_grad_hidden=reduce_grad_hidden, logits_dtype=logits_dtype)
    shape = targets.shape
    if logp_old is None:
        logp_old = logp.detach().view(shape)
    loss, metrics = policy_loss_reference(logp.view(shape), logp_old, advantages, mask, s, logp_ref=logp_ref,
                                          kl_weight=kl_weight, tis_weight=tis_weight,
                                          entropy=None if ent is None else ent.view(shape), num_tokens=num_tokens,
                                          num_seqs=num_seqs, seq_index=seq_index)
    return (loss, metrics, logp.detach()) if return_logp else (loss, metrics)
