"""The published Qwen2.5-VL configurations (3B, 7B, 32B, 72B Instruct), for planning runs whose checkpoint is not on
this machine.

`megaapo plan` (and `benchmarks/memory_plan.py`) needs a model's shapes only, never its weights. When `model.path`
names a checkpoint directory that does not exist here but whose name is one of these models
(`checkpoints/Qwen2.5-VL-7B-Instruct`), the plan is made from the values below, copied from the models'
`config.json` on the Hugging Face hub. A local `config.json` always wins.
"""

from __future__ import annotations

import re
from pathlib import Path

# text: hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings; vision: intermediate (all four share
# depth 32, hidden 1280, 16 heads, window 112, full attention in blocks 7/15/23/31; the merger maps to text hidden)
_TEXT = {
    "3b": (2048, 11008, 36, 16, 2, 151936, True, 3420),
    "7b": (3584, 18944, 28, 28, 4, 152064, False, 3420),
    "32b": (5120, 27648, 64, 40, 8, 152064, False, 3456),
    "72b": (8192, 29568, 80, 64, 8, 152064, False, 3456),
}
_NAME = re.compile(r"qwen2\.5-vl-(3|7|32|72)b", re.IGNORECASE)


def published_size(path: str | Path) -> str | None:
    """'3b' for '.../Qwen2.5-VL-3B-Instruct' (any case, any suffix), else None."""
    m = _NAME.search(Path(path).name)
    return f"{m.group(1)}b" if m else None


def published_config(size: str):
    """A transformers `Qwen2_5_VLConfig` equal to the hub's config.json of Qwen2.5-VL-<size>-Instruct."""
    from transformers import Qwen2_5_VLConfig

    hidden, inter, layers, heads, kv, vocab, tied, v_inter = _TEXT[size]
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=tied,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                          "rope_theta": 1e6},
                         bos_token_id=151643, eos_token_id=151645),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=v_inter, num_heads=16, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           out_hidden_size=hidden, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
                           hidden_act="silu"),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=tied)
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg
