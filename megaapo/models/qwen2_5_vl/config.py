"""The one adapter from a Hugging Face Qwen2.5-VL `config.json` to megatron-core: `TransformerConfig` + layer spec.

Called by the learner and the converter. Everything megatron-core needs to compute what transformers'
`Qwen2_5_VLForConditionalGeneration` computes is decided here: QKV bias without other linear biases, RMSNorm,
SwiGLU, grouped-query attention, multimodal rotary embedding with the checkpoint's `mrope_section` and theta, tied
or untied embeddings. Layouts that cannot work (heads or vocabulary not divisible by TP, layers by PP) fail here with
the setting named, before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: wrong architecture, missing tensors, shapes vs. parallel layout."""


@dataclass(frozen=True)
class LMShape:
    """The language model's dimensions as the rest of megaapo needs them (FLOPs, buffers, weight maps)."""

    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool
    image_token_id: int
    video_token_id: int
    spatial_merge_size: int
    tokens_per_second: float

    def num_params(self) -> int:
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        attn = h * d * (self.num_heads + 2 * self.num_kv_heads) + d * (self.num_heads + 2 * self.num_kv_heads)
        attn += self.num_heads * d * h
        per_layer = attn + 3 * h * f + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + emb + h


def load_hf_config(path: str | Path):
    """Read and check an HF directory's config; raises CheckpointError unless it is a Qwen2.5-VL."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; expected a Hugging Face Qwen2.5-VL checkpoint directory")
    cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type != "qwen2_5_vl":
        raise CheckpointError(f"{path}: model_type is {cfg.model_type!r}; megaapo's learner implements 'qwen2_5_vl'")
    return cfg


def lm_shape(hf_cfg) -> LMShape:
    t = hf_cfg.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return LMShape(vocab_size=t.vocab_size, hidden_size=t.hidden_size, ffn_hidden_size=t.intermediate_size,
                   num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
                   num_kv_heads=t.num_key_value_heads, head_dim=head_dim,
                   tie_embeddings=bool(hf_cfg.tie_word_embeddings or getattr(t, "tie_word_embeddings", False)),
                   image_token_id=hf_cfg.image_token_id, video_token_id=hf_cfg.video_token_id,
                   spatial_merge_size=hf_cfg.vision_config.spatial_merge_size,
                   tokens_per_second=hf_cfg.vision_config.tokens_per_second)


def check_layout(shape: LMShape, tp: int, pp: int) -> None:
    """Fail with the setting named when the checkpoint cannot be split tp x pp."""
    problems = []
    if shape.num_kv_heads % tp:
        problems.append(f"num_key_value_heads={shape.num_kv_heads} is not divisible by parallel.tp={tp}")
    if shape.num_heads % tp:
        problems.append(f"num_attention_heads={shape.num_heads} is not divisible by parallel.tp={tp}")
    if shape.ffn_hidden_size % tp:
        problems.append(f"intermediate_size={shape.ffn_hidden_size} is not divisible by parallel.tp={tp}")
    if shape.vocab_size % tp:
        problems.append(f"vocab_size={shape.vocab_size} is not divisible by parallel.tp={tp}")
    if shape.num_layers % pp:
        problems.append(f"num_hidden_layers={shape.num_layers} is not divisible by parallel.pp={pp}")
    if problems:
        raise CheckpointError("cannot lay out this checkpoint: " + "; ".join(problems))


def transformer_config(hf_cfg, *, dtype: str = "float32", recompute: str = "none", pp: int = 1,
                       tp: int = 1, sequence_parallel: bool = False):
    """megatron-core TransformerConfig equal to the HF text model (dropout off: RL log-probs must be deterministic)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    shape = lm_shape(hf_cfg)
    check_layout(shape, tp, pp)
    t = hf_cfg.text_config
    rope = t.rope_parameters or {}
    if t.hidden_act != "silu":
        raise CheckpointError(f"text_config.hidden_act={t.hidden_act!r}; Qwen2.5-VL uses 'silu'")
    params_dtype = DTYPES[dtype]
    gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_heads, num_query_groups=shape.num_kv_heads, kv_channels=shape.head_dim,
        add_bias_linear=False, add_qkv_bias=True, normalization="RMSNorm", layernorm_epsilon=t.rms_norm_eps,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        hidden_dropout=0.0, attention_dropout=0.0, mrope_section=list(rope["mrope_section"]),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype, variable_seq_lengths=True, moe_token_dispatcher_type="alltoall",  # (no MoE)
        # Weights always come from a checkpoint: skip random init, allocate where the model will live.
        perform_initialization=False, use_cpu_initialization=not gpu,
        # The fused CUDA paths are unavailable on CPU; on GPU they are what makes megatron fast. Not the rope: TE's
        # fused THD rope would index the rotary table from 0 in every packed sample, wrong for per-token mrope.
        bias_activation_fusion=gpu, bias_dropout_fusion=gpu, apply_rope_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=True,
    )
    if recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        kwargs.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    return TransformerConfig(**kwargs)


def rotary_base(hf_cfg) -> float:
    rope = hf_cfg.text_config.rope_parameters or {}
    return float(rope.get("rope_theta", getattr(hf_cfg.text_config, "rope_theta", 1e6)))


def layer_spec(attention: str = "sdpa"):
    """megatron-core's local GPT layer spec with our core attention (megaapo.models.qwen2_5_vl.attention): "sdpa"
    (torch's kernels), "flash" (packed rows through the flash-attn package), or "te": Transformer Engine's spec,
    whose attention takes packed rows in its THD layout."""
    if attention == "te":
        try:
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
            return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
        except ImportError as e:
            raise CheckpointError(f"model.attention=te needs Transformer Engine: {e}") from e
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from .attention import FlashAttnVarlen, SDPAttention

    if attention == "flash":
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            raise CheckpointError("model.attention=flash needs the flash-attn package; model.attention=sdpa runs "
                                  f"torch's own FlashAttention varlen kernel for packed rows ({e})") from e
    spec = get_gpt_layer_local_spec(qk_layernorm=False, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = FlashAttnVarlen if attention == "flash" \
        else SDPAttention
    return spec
