"""Qwen2.5-VL as megatron-core parts: transformers' vision tower feeding a megatron-core `GPTModel` with mrope.

The language model is megatron-core's `GPTModel` (tensor- and pipeline-parallel layers, our SDPA core attention),
configured by `config.py`. The vision tower is transformers' own `Qwen2_5_VisionTransformerPretrainedModel` (window
attention with full-attention blocks, 2D rotary, patch merger): a few percent of the FLOPs, so it lives on the first
pipeline stage and is replicated on every tensor-parallel rank; its merged features replace the `<|image_pad|>`
embeddings. The model stops at the final norm and returns hidden states: log-probs are computed from them by
`megaapo.models.logprob` (fused kernel on GPU), so [tokens, vocab] logits never exist in full.

This file holds no distributed logic beyond passing megatron's process-group collection to its layers.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import layer_spec, lm_shape, rotary_base, transformer_config


class Qwen25VLModel(nn.Module):
    """One pipeline stage of Qwen2.5-VL. forward -> hidden states [s, b, h] (last stage: after the final norm)."""

    def __init__(self, hf_cfg, groups, *, dtype: str = "float32", attention: str = "sdpa", recompute: str = "none",
                 max_sequence_length: int = 32768):
        super().__init__()
        from megatron.core.enums import ModelType
        from megatron.core.models.gpt import GPTModel

        self.model_type = ModelType.encoder_or_decoder   # read by megatron's pipeline schedules

        self.shape = lm_shape(hf_cfg)
        self.attention = attention
        self.config = transformer_config(hf_cfg, dtype=dtype, recompute=recompute, tp=groups.tp_size,
                                         pp=groups.pp_size)
        self.pre_process, self.post_process = groups.first_stage, groups.last_stage
        self.lm = GPTModel(self.config, layer_spec(attention), vocab_size=self.shape.vocab_size,
                           max_sequence_length=max_sequence_length, pre_process=self.pre_process,
                           post_process=self.post_process, parallel_output=True,
                           share_embeddings_and_output_weights=self.shape.tie_embeddings,
                           position_embedding_type="mrope", rotary_base=rotary_base(hf_cfg),
                           pg_collection=groups.pgc)
        self.vision = None
        if self.pre_process:
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

            vcfg = hf_cfg.vision_config
            vcfg._attn_implementation = "sdpa"
            self.vision = Qwen2_5_VisionTransformerPretrainedModel(vcfg).to(self.config.params_dtype)
        self.layer_offset = groups.pp_rank * (self.shape.num_layers // groups.pp_size)
        self.tp_group = groups.tp
        self._mark_tp_shards()

    def _mark_tp_shards(self) -> None:
        """Give every tensor-parallel shard megatron's TP attributes. megatron sets them while initialising weights,
        which is skipped here (weights come from the checkpoint); its gradient norm counts a parameter on every TP
        rank only when they are set."""
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        from .weights import tp_split_of

        for name, p in self.named_parameters():
            split = tp_split_of(name)
            if split is not None and not getattr(p, "tensor_model_parallel", False):
                set_tensor_model_parallel_attributes(p, True, 1 if split == "cols" else 0, 1)

    # megatron's pipeline schedule hands the previous stage's activations in through this hook.
    def set_input_tensor(self, input_tensor) -> None:
        self.lm.set_input_tensor(input_tensor)

    def output_weight(self) -> torch.Tensor:
        """The (vocab-parallel) lm_head weight [V / tp, h] on the last stage; the word embedding when tied."""
        if self.shape.tie_embeddings:
            return self.lm.shared_embedding_or_output_weight()
        return self.lm.output_layer.weight

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, image_mask=None,
              feature_index=None) -> torch.Tensor:
        """Word embeddings [s, b, h] with image features in place of the image-pad tokens (image_mask [b, s]; by
        default every image-pad token). feature_index [image tokens] picks, for each image pad in order, its row of
        the vision output, so an image shared by several samples is encoded once."""
        emb = self.lm.embedding(input_ids=input_ids, position_ids=None)
        if image_mask is None:
            image_mask = input_ids == self.shape.image_token_id
        n_tokens = int(image_mask.sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(f"batch holds {n_tokens} image tokens but no pixel_values")
            return emb
        feats = self.vision(pixel_values.to(self.config.params_dtype), grid_thw=image_grid_thw).pooler_output
        if feature_index is not None:
            feats = feats.index_select(0, feature_index.to(feats.device))
        if feats.shape[0] != n_tokens:
            raise ValueError(f"batch holds {n_tokens} image tokens but the images give {feats.shape[0]} features "
                             "(a response that contains <|image_pad|> must be filtered before training)")
        emb = emb.transpose(0, 1)
        emb = emb.masked_scatter(image_mask.unsqueeze(-1), feats.to(emb.dtype))
        return emb.transpose(0, 1).contiguous()

    def packed_seq_params(self, cu_seqlens: torch.Tensor, max_seqlen: int, device):
        """The PackedSeqParams of a packed row in this model's attention layout (attention.packed_seq_params)."""
        from .attention import packed_seq_params

        return packed_seq_params(cu_seqlens, max_seqlen, self.attention, device)

    def forward(self, input_ids, position_ids, packed_seq_params=None, pixel_values=None, image_grid_thw=None,
                image_mask=None, feature_index=None):
        """input_ids [b, s], position_ids [3, b, s] (each sample's own positions); packed_seq_params: the sample
        boundaries of a packed row (b = 1), None for causal rows."""
        hidden = self.embed(input_ids, pixel_values, image_grid_thw, image_mask, feature_index) \
            if self.pre_process else None
        rotary = self.lm.rotary_pos_emb(position_ids, self.lm.mrope_section)
        return self.lm.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary,
                               packed_seq_params=packed_seq_params)
