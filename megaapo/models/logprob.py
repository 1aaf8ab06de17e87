"""Per-token log-probs (and entropy) of target tokens from final hidden states and a vocab-parallel lm_head.

The learner's single entry point for log p(token) in the old-policy, reference and training passes. On GPU it calls
the fused Triton kernel (`kernels.fused_logprob`), which never materialises [tokens, vocab] logits; on CPU it runs
the PyTorch reference below, chunked over tokens so memory stays bounded. Both reduce the softmax statistics over the
tensor-parallel group, where each rank holds `V / tp` rows of the lm_head.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _tp_reference(hidden, weight, labels, temperature, tp_group, want_entropy):
    """hidden [N, h], weight [V/tp, h], labels [N] -> (logp [N] fp32, entropy [N] fp32 or None)."""
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        reduce_from_tensor_model_parallel_region)

    tp = tp_group.size() if tp_group is not None else 1
    if tp > 1:
        # Each rank sees only its vocabulary rows: the gradient w.r.t. hidden is the sum over ranks.
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    logits = (hidden @ weight.t()).float() / temperature
    vocab_start = (tp_group.rank() if tp > 1 else 0) * weight.shape[0]
    row_max = logits.detach().max(-1).values
    if tp > 1:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - row_max.unsqueeze(-1)
    exp = shifted.exp()
    sum_exp = exp.sum(-1)
    local = labels - vocab_start
    in_shard = (local >= 0) & (local < weight.shape[0])
    target = shifted.gather(-1, local.clamp(0, weight.shape[0] - 1).unsqueeze(-1)).squeeze(-1) * in_shard
    ent_num = (exp * shifted).sum(-1) if want_entropy else None
    if tp > 1:
        sum_exp = reduce_from_tensor_model_parallel_region(sum_exp, group=tp_group)
        target = reduce_from_tensor_model_parallel_region(target, group=tp_group)
        if want_entropy:
            ent_num = reduce_from_tensor_model_parallel_region(ent_num, group=tp_group)
    log_z = sum_exp.log()
    logp = target - log_z
    entropy = (log_z - ent_num / sum_exp) if want_entropy else None
    return logp, entropy


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   tp_group=None, entropy: bool = False, chunk_tokens: int = 4096, use_kernel: bool | None = None,
                   main_grad: torch.Tensor | None = None):
    """hidden [N, h], weight [V/tp, h], labels [N] (global vocabulary ids) -> (logp [N], entropy [N] | None), fp32.

    main_grad: megatron's fp32 gradient buffer of `weight`; the kernel adds the weight gradient there (the PyTorch
    path leaves it in weight.grad, where megatron's DDP hook adds it)."""
    if use_kernel is None:
        use_kernel = hidden.is_cuda
    if use_kernel:
        from kernels.fused_logprob import fused_logprob
        return fused_logprob(hidden, weight, labels, temperature=temperature, tp_group=tp_group,
                             return_entropy=entropy, main_grad=main_grad)
    outs = [_tp_reference(hidden[i:i + chunk_tokens], weight, labels[i:i + chunk_tokens], temperature, tp_group,
                          entropy) for i in range(0, hidden.shape[0], chunk_tokens)] or [(hidden.new_zeros(0), None)]
    logp = torch.cat([o[0] for o in outs])
    ent = torch.cat([o[1] for o in outs]) if entropy else None
    return logp, ent
