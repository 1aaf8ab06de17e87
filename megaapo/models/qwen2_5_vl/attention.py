"""Core attention for the megatron-core layer spec: torch SDPA (flash / cuDNN / memory-efficient backends).

Replaces megatron-core's `DotProductAttention`, which materialises [b, heads, s, s] scores in the input dtype and
rejects packed sequences. Packing is expressed as a boolean mask (True = masked, megatron's convention) built by
`megaapo.data.packing`: block-diagonal causal, so no token attends across the responses sharing a row. Without a
mask the call is plain causal attention, which lets SDPA pick its flash kernel on GPU.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """Signature-compatible with megatron-core's core attention: q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, hp]."""

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
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention takes packing as a block-diagonal attention_mask, not packed_seq_params")
        sq, b = query.shape[:2]
        # [s, b, h, d] -> [b, h, s, d]; GQA through SDPA's enable_gqa avoids materialising repeated K/V.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.dropout if self.training else 0.0
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.scale,
                                                 enable_gqa=self.groups != self.heads)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=dropout,
                                                 scale=self.scale, enable_gqa=self.groups != self.heads)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
