"""Core attention for the megatron-core layer spec: causal SDPA for plain rows, variable-length attention for packed.

Replaces megatron-core's `DotProductAttention`, which materialises [b, heads, s, s] scores in the input dtype and
rejects packed sequences. Two kinds of micro-batch reach it (built by `megaapo.data.packing`):
- plain rows (one sample per row, right-padded): causal SDPA, which takes its flash kernel on GPU (GQA included);
- packed rows (several samples in one row): megatron's `PackedSeqParams` with the samples' boundaries as
  `cu_seqlens`; each sample attends causally to itself only. No [T, T] mask or score tensor exists on this path.

The packed kernel, by where it runs (`varlen_backend` names the one a call takes):
- CUDA, bf16/fp16: flash-attn's `flash_attn_varlen_func` when `model.attention=flash`, else torch's own
  `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10: the FlashAttention-2 varlen kernel bundled with torch, GQA
  native, with its backward). Its signature changed between torch releases; `_varlen_kwargs` adapts.
- everywhere else (CPU; CUDA fp32 or an older torch): causal SDPA once per sample. On CPU that is torch's fused
  flash kernel (4-D inputs; 3-D ones fall back to the math path), exact and O(L) memory per sample.
Chosen by measurement and by what trains on CPU: flex_attention has no backward on CPU and recompiles per shape on
GPU; nested jagged tensors reach CUDA code on a CUDA build without a GPU. See docs/attention.md.

Transformer Engine's own core attention (`model.attention=te`) takes the same `PackedSeqParams` in its THD layout,
where megatron switches its mask type to padding-causal (`packed_seq_params` below chooses the layout).
Built into every layer by `config.layer_spec`; the learner makes a packed row's PackedSeqParams through the model.
"""

from __future__ import annotations

import inspect
import math
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int, attention: str, device):
    """megatron's PackedSeqParams for one packed row. cu_seqlens [n + 1] = sample boundaries in the row.

    Transformer Engine gets THD (megatron squeezes q/k/v to [t, heads, d], applies rope per sample through
    cu_seqlens and runs TE with the padding-causal mask). Our attention gets the same cu_seqlens in the SBHD layout
    (b = 1): megatron then applies rope to the row as it does to any row (the mrope table holds every token's own
    position already) and needs no host sync per layer for the THD rope's per-sample split."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd" if attention == "te" else "sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))


@lru_cache(maxsize=1)
def _torch_varlen():
    """(torch's varlen_attn, its parameter names), or None before torch 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_kwargs(params, scale: float, head_dim: int, gqa: bool) -> Optional[dict]:
    """Keyword arguments for causal attention in the given `varlen_attn` parameter names, or None when that version
    cannot express the call. torch 2.10 takes `is_causal` (no scale: its default 1/sqrt(d) only); later releases take
    `window_size=(-1, 0)` and `scale`; 2.12+ also want `enable_gqa=True` when K/V have fewer heads (before that the
    kernel takes GQA without being told)."""
    kwargs: dict = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    elif "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        return None
    if "scale" in params:
        kwargs["scale"] = scale
    elif not math.isclose(scale, head_dim ** -0.5, rel_tol=1e-6):
        return None
    if gqa and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return kwargs


def varlen_backend(q: torch.Tensor, scale: float, groups: int, flash_attn: bool = False) -> str:
    """Which kernel `varlen_attention` runs for q [T, heads, d]: flash_attn, torch_varlen or per_sample_sdpa."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        if flash_attn:
            return "flash_attn"
        found = _torch_varlen()
        if found is not None and _varlen_kwargs(found[1], scale, q.shape[-1], groups != q.shape[1]) is not None:
            return "torch_varlen"
    return "per_sample_sdpa"


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     scale: float, flash_attn: bool = False) -> torch.Tensor:
    """Causal attention within each sample of a packed row: q [T, heads, d], k/v [T, groups, d], cu_seqlens [n + 1]
    (int32, on q's device for the CUDA kernels) -> [T, heads, d]."""
    backend = varlen_backend(q, scale, k.shape[1], flash_attn)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0,
                                      softmax_scale=scale, causal=True)
    if backend == "torch_varlen":
        fn, params = _torch_varlen()
        kwargs = _varlen_kwargs(params, scale, q.shape[-1], k.shape[1] != q.shape[1])
        return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
    return _per_sample(q, k, v, cu_seqlens, scale)


def _per_sample(q, k, v, cu_seqlens, scale):
    """Causal SDPA once per sample, [1, heads, L, d] each: 4-D is what takes torch's fused CPU flash kernel."""
    bounds = cu_seqlens.tolist()   # a host copy; free on CPU, one sync per layer on the CUDA fallback
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    gqa = k.shape[1] != q.shape[1]
    if gqa and q.is_cuda:
        # CUDA's memory-efficient kernel (the one for fp32) refuses GQA and SDPA would fall back to the math path,
        # [heads, L, L] per sample: repeat K/V instead (O(L) memory).
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), False
    outs = []
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (qs, ks, vs))
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


class SDPAttention(MegatronModule):
    """Signature-compatible with megatron-core's core attention: q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, hp]
    (packed THD: q [t, np, hn] -> [t, hp])."""

    flash_attn = False   # the packed kernel: torch's own; FlashAttnVarlen uses the flash-attn package

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPA core attention does not implement context parallelism")
        tp = pg_collection.tp.size() if pg_collection is not None else 1
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("SDPAttention is causal; packed rows come as packed_seq_params (cu_seqlens), not a mask")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        sq, b = query.shape[:2]
        # [s, b, h, d] -> [b, h, s, d]; GQA through SDPA's enable_gqa avoids materialising repeated K/V.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.scale,
                                             enable_gqa=self.groups != self.heads)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _packed(self, query, key, value, params):
        if self.training and self.dropout > 0:
            raise ValueError("packed attention has no dropout (RL log-probs need attention_dropout=0)")
        thd = params.qkv_format == "thd"
        if not thd and query.shape[1] != 1:
            raise ValueError(f"a packed row is one row of the micro-batch, got b={query.shape[1]}")
        q, k, v = (t if thd else t[:, 0] for t in (query, key, value))
        out = varlen_attention(q, k, v, params.cu_seqlens_q, params.max_seqlen_q, self.scale, self.flash_attn)
        return out.reshape(out.shape[0], -1) if thd else out.reshape(out.shape[0], 1, -1)


class FlashAttnVarlen(SDPAttention):
    """`model.attention=flash`: packed rows through the flash-attn package's varlen kernel (CUDA, bf16/fp16)."""

    flash_attn = True
