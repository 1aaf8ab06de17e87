"""`megaapo model tiny` checkpoints load and generate in transformers; our `kernels` package does not confuse it."""

import json
import subprocess
import sys

import pytest
import torch


def test_tiny_model_generates_from_a_synthetic_image(tiny_model, synth_dir):
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    proc = AutoProcessor.from_pretrained(tiny_model)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model).eval()
    row = json.loads((synth_dir / "train.jsonl").read_text().splitlines()[0])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = proc(text=[text], images=[Image.open(synth_dir / row["images"][0])], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 16  # 112x112 -> 8x8 patches / 4
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        again = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1] and torch.equal(out, again)
    assert len(proc.tokenizer) <= model.config.text_config.vocab_size
    # the reasoning tags are single tokens in the small vocabulary
    assert len(proc.tokenizer("<think></think><answer>3</answer>")["input_ids"]) == 5


@pytest.mark.slow
def test_real_vocab_tied_checkpoint(tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    out = tmp_path / "real"
    run = subprocess.run([sys.executable, "-m", "megaapo.cli", "model", "tiny", "--out", str(out), "--vocab", "real",
                          "--tie-embeddings"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    tok = AutoTokenizer.from_pretrained(out)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    assert model.config.text_config.vocab_size == 151936
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"]) == \
        [151643, 151644, 151645, 151655]
    assert tok.decode(tok("Hello world, 12345!")["input_ids"]) == "Hello world, 12345!"
    assert len(tok("Hello world")["input_ids"]) == 2  # real BPE merges, not bytes


def test_transformers_does_not_take_our_kernels_package_for_the_hub_one(tiny_model):
    # PyPI's unrelated `kernels` (the kernel hub) is probed by transformers; ours must not look like it.
    code = f"""
import kernels, transformers
from transformers.utils import import_utils
assert import_utils.is_kernels_available() is False, 'transformers thinks our kernels package is the kernel hub'
from transformers import Qwen2_5_VLForConditionalGeneration
m = Qwen2_5_VLForConditionalGeneration.from_pretrained({str(tiny_model)!r})
print('loaded', type(m).__name__, kernels.__file__)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "loaded Qwen2_5_VLForConditionalGeneration" in run.stdout and "/kernels/__init__.py" in run.stdout
