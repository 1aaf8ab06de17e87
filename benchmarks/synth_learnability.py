"""Is the synthetic data learnable by a tiny model on CPU, and is its top level hard? A supervised probe.

    python benchmarks/synth_learnability.py [--steps 600] [--tasks count] [--levels 2 3]

Trains the tiny random-weight Qwen2.5-VL (`megaapo model tiny` defaults) with plain supervised cross-entropy on the
answer (`<answer>N</answer>`, direct prompt style) for each (task, level), then prints held-out greedy accuracy
next to the majority-class baseline of the same held-out set. Pure PyTorch + transformers, no vLLM.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from PIL import Image


def run(task: str, level: int, steps: int, n_train: int, n_eval: int, lr: float, batch: int, work: Path) -> tuple:
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from megaapo.data import Example, PromptBuilder, load_examples
    from megaapo.data.synth import generate
    from megaapo.models.tiny import build_tiny

    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        build_tiny(model_dir)
    data = work / f"{task}{level}"
    generate(data, n_train, n_eval, seed=0, tasks=[task], levels=[level], image_size=84, progress=False)
    proc = AutoProcessor.from_pretrained(model_dir)
    tok = proc.tokenizer
    builder = PromptBuilder(tok, "direct")
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def encode(exs: list[Example], with_answer: bool):
        texts = [builder.build(e).text + (f"<answer>{e.answer}</answer><|im_end|>" if with_answer else "")
                 for e in exs]
        images = [Image.open(e.images[0]) for e in exs]
        return proc(text=texts, images=images, return_tensors="pt", padding=True)

    train, _ = load_examples(data / "train.jsonl")
    evals, _ = load_examples(data / "eval.jsonl")
    prompt_len = {}
    t0 = time.perf_counter()
    for step in range(steps):
        exs = [train[(step * batch + i) % len(train)] for i in range(batch)]
        enc = encode(exs, True)
        labels = enc["input_ids"].clone()
        for i, e in enumerate(exs):  # loss on the answer only (left padding: the answer sits at the end)
            n_ans = prompt_len.setdefault(e.answer, len(tok(f"<answer>{e.answer}</answer><|im_end|>")["input_ids"]))
            labels[i, : labels.shape[1] - n_ans] = -100
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(evals), 50):
            exs = evals[i:i + 50]
            enc = encode(exs, False)
            out = model.generate(**enc, max_new_tokens=6, do_sample=False)
            for e, ids in zip(exs, out[:, enc["input_ids"].shape[1]:]):
                correct += tok.decode(ids, skip_special_tokens=True).strip() == f"<answer>{e.answer}</answer>"
    majority = collections.Counter(e.answer for e in evals).most_common(1)[0][1] / len(evals)
    return correct / len(evals), majority, train_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--tasks", nargs="+", default=["count"])
    ap.add_argument("--levels", nargs="+", type=int, default=[2, 3])
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(t, lv, *run(t, lv, args.steps, args.n_train, args.n_eval, args.lr, args.batch, Path(tmp)))
                for t in args.tasks for lv in args.levels]
    print(f"supervised probe, tiny Qwen2.5-VL (0.44M params), {args.steps} steps x {args.batch}, lr {args.lr}, "
          f"84x84 images, {date.today()}")
    print("| task | level | held-out accuracy | majority baseline | train time |")
    print("|---|---|---|---|---|")
    for t, lv, acc, maj, s in rows:
        print(f"| {t} | {lv} | {acc:.1%} | {maj:.1%} | {s:.0f} s |")


if __name__ == "__main__":
    main()
