"""Learner throughput: megaapo's megatron-core Qwen2.5-VL vs HF transformers, tokens/s and MFU, same run.

    python benchmarks/learner.py                  # GPU: Qwen2.5-VL-3B-shaped (random weights), 4 x 4096 tokens, bf16
    python benchmarks/learner.py --smoke          # CPU: the tiny model, to check the script end to end
    python benchmarks/learner.py --write-docs     # also write the table to docs/learner.md
    python benchmarks/learner.py --optim torch    # torch AdamW instead of megatron's distributed optimizer

Both sides do the same work per step: a forward and backward of `--batch` sequences of `--seq` tokens with a loss on
every token's log-prob, then an AdamW step (ours: megatron-core's DDP buffers + distributed optimizer, `optim.impl`
auto on GPU, with the fused log-prob kernel adding the lm_head gradient into megatron's fp32 main_grad). MFU counts
model FLOPs (6 N per token + attention), not recompute. The two run one after the other in one process: the
megatron learner (and megatron's parallel state) is freed before the HF model loads, and each side's peak memory
is counted from a fresh peak counter, above what was allocated before it started.
The anchors (../shared/ANCHORS.md, one H100): HF 41% MFU; plain megatron-core with SDPA 48.5% at 2 x 4096.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE_3B = dict(hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, intermediate_size=11008,
                vision_depth=2, vision_hidden_size=128, vocab="real", tie_embeddings=True)


def build_checkpoint(out: Path, smoke: bool, dtype: str) -> Path:
    from megaapo.models.tiny import build_tiny

    if smoke:
        return build_tiny(out, vocab="small", num_heads=2, num_kv_heads=2)
    return build_tiny(out, dtype=dtype, **SHAPE_3B)


def fpt(shape, seq: int) -> float:
    from megaapo.metrics import flops_per_token

    return flops_per_token(hidden_size=shape.hidden_size, num_layers=shape.num_layers,
                           intermediate_size=shape.ffn_hidden_size, vocab_size=shape.vocab_size, seq_len=seq,
                           num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim)


def fresh_device() -> int:
    """Free what earlier work left and restart the device's peak-memory counter; returns the bytes still allocated.
    The cycle collector runs first: megatron's modules, DDP hooks and optimizer reference each other, so a learner
    that went out of scope keeps its GPU memory until a collection finds the cycle."""
    gc.collect()
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def measured(bench, *args) -> dict:
    """bench(*args) from a fresh device, with everything it built freed afterwards. Adds peak_gib (the peak above
    what was allocated before it) and left_gib (what it left allocated: ~0 unless something still holds it)."""
    base = fresh_device()
    try:
        result = bench(*args)
    except torch.OutOfMemoryError as e:   # a row of the table, not the end of the comparison
        print(f"{bench.__name__}: out of memory: {str(e).splitlines()[0]}")
        result = {"seconds": float("nan"), "error": "out of memory"}
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if torch.cuda.is_available() else float("nan")
    left = (fresh_device() - base) / 2**30 if torch.cuda.is_available() else float("nan")
    return dict(result, peak_gib=peak, left_gib=left)


def bench_megaapo(path: Path, batch: int, seq: int, steps: int, dtype: str, optim: str) -> dict:
    from megaapo.config import ModelConfig, OptimConfig, ParallelConfig
    from megaapo.distributed import destroy, init_distributed
    from megaapo.learner import Learner
    from megaapo.supervised import nll_loss

    groups = init_distributed(1, 1)
    learner = Learner(path, groups, ModelConfig(dtype=dtype, recompute="selective"),
                      ParallelConfig(micro_batch_tokens=seq), OptimConfig(impl=optim, lr=1e-5))
    vocab = learner.shape.vocab_size
    top = min(vocab, 150000, learner.shape.image_token_id)   # text only: no image pads without images
    samples = [learner.make_sample(torch.randint(0, top, (seq,)), 1) for _ in range(batch)]
    loss = nll_loss(batch * (seq - 1))
    times = []
    for i in range(steps + 1):
        _sync()
        t = time.perf_counter()
        learner.train_step(samples, loss)
        _sync()
        times.append(time.perf_counter() - t)
    result = {"seconds": sorted(times[1:])[len(times[1:]) // 2], "shape": learner.shape,
              "optim": learner.optim.name}
    del learner, samples
    destroy()   # megatron's parallel state holds buffers of its own (e.g. the global memory buffer)
    return result


def bench_hf(path: Path, batch: int, seq: int, steps: int, dtype: str) -> dict:
    from transformers import Qwen2_5_VLForConditionalGeneration

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype),
                                                               attn_implementation="sdpa").to(dev)
    model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    top = min(model.config.text_config.vocab_size, 150000, model.config.image_token_id)
    ids = torch.randint(0, top, (batch, seq), device=dev)
    times = []
    for i in range(steps + 1):
        _sync()
        t = time.perf_counter()
        for b in range(batch):   # one sequence per micro-batch, as the learner's token budget does
            out = model(input_ids=ids[b:b + 1], labels=ids[b:b + 1])
            (out.loss / batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - t)
    return {"seconds": sorted(times[1:])[len(times[1:]) // 2]}


def table_rows(rows, tokens: int, per_token, peak, hf) -> list[str]:
    """The markdown table: time per step, throughput, MFU, peak memory, speed relative to HF."""
    from megaapo.metrics import mfu

    out = ["| implementation | s/step | tokens/s | MFU | peak GiB | vs HF |", "|---|---|---|---|---|---|"]
    for name, r in rows:
        if "error" in r:
            out.append(f"| {name} | {r['error']} | - | - | {r['peak_gib']:.1f} | - |")
            continue
        rate = tokens / r["seconds"]
        util = mfu(rate, per_token, peak) if per_token else None
        ratio = hf["seconds"] / r["seconds"] if hf and "error" not in hf else float("nan")
        out.append(f"| {name} | {r['seconds']:.3f} | {rate:,.0f} | "
                   f"{'n/a' if util is None else f'{100 * util:.1f}%'} | {r['peak_gib']:.1f} | {ratio:.2f}x |")
    out += [f"\nnote: the {name} run left {r['left_gib']:.2f} GiB allocated after it was freed"
            for name, r in rows if r["left_gib"] > 0.25]    # NaN (CPU) compares False
    return out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--optim", choices=["auto", "megatron", "torch"], default="auto",
                   help="the learner's optimizer (optim.impl); auto: megatron on GPU, torch on CPU")
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.batch, args.seq, args.steps = 2, 128, 2
    dtype = "float32" if args.smoke or not torch.cuda.is_available() else "bfloat16"
    from megaapo.metrics import device_peak_flops

    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(Path(tmp) / "model", args.smoke, dtype)
        ours = measured(bench_megaapo, path, args.batch, args.seq, args.steps, dtype, args.optim)
        hf = None if args.skip_hf else measured(bench_hf, path, args.batch, args.seq, args.steps, dtype)
    tokens = args.batch * args.seq
    per_token = fpt(ours["shape"], args.seq) if "shape" in ours else None
    peak = device_peak_flops(dtype) if torch.cuda.is_available() else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    rows = [(f"megaapo learner (megatron-core, SDPA, {ours.get('optim', args.optim)} optimizer)", ours)] + \
        ([("HF transformers (SDPA)", hf)] if hf else [])
    lines = [f"device: {device}; {args.batch} x {args.seq} tokens per step, {dtype}; "
             f"{datetime.date.today().isoformat()}", "", *table_rows(rows, tokens, per_token, peak, hf)]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        doc = ROOT / "docs" / "learner.md"
        text = doc.read_text() if doc.exists() else ""
        marker = "## Throughput (benchmarks/learner.py)"
        head = text.split(marker)[0].rstrip() + "\n\n" if marker in text else text
        doc.write_text(head + marker + "\n\n" + table + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
