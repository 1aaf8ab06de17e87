"""Packed vs padded micro-batches, same run: attention alone (packing as it was, with a dense block-diagonal mask;
packing now, variable-length attention; right-padded rows) and whole learner steps (parallel.sequence_packing on/off).

    python benchmarks/packing.py                  # GPU: Qwen2.5-VL-3B attention (16 heads, 2 KV, d 128), bf16
    python benchmarks/packing.py --smoke          # CPU: small heads, fp32, a tiny model's learner steps
    python benchmarks/packing.py --write-docs     # also write the tables to docs/attention.md

Every layout sees the same samples (a fixed mix of lengths filling each row exactly). Attention is timed forward +
backward. Memory: on GPU the allocator's peak above the inputs; on CPU the peak of live tensor bytes made by the
step's ops (a dispatch-mode tracker: deterministic, counts every tensor an op returns, not a kernel's private
scratch). "tokens computed" counts the padding a layout pays for in every layer. A layout that runs out of memory is
reported as such. Called by hand and by the GPU check.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops return while active (storages shared by views counted once)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list] = {}
        self.now = self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in self.live:
                    self.live[ptr] = [storage.nbytes(), 0]
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                self.live[ptr][1] += 1
                weakref.finalize(t, self._release, ptr)
        return out


def sample_lengths(total: int, scale: float, seed: int = 0) -> list[int]:
    """RL-like sample lengths (prompt 200-800 + response 16-2000 tokens, times `scale`) up to `total` tokens; the
    last one is cut so that they fill `total` exactly."""
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while sum(out) < total:
        n = int((torch.randint(200, 800, (1,), generator=g) + torch.randint(16, 2000, (1,), generator=g)) * scale)
        out.append(max(8, min(n, total - sum(out))))
    return out


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, dev, reps: int) -> tuple[float, float]:
    """(median seconds, peak MiB) of fn(); memory from a separate run (the tracker slows ops down)."""
    times = []
    try:
        for _ in range(reps + 1):
            _sync(dev)
            t = time.perf_counter()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - t)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            with LiveBytes() as mem:
                fn()
            peak = mem.peak / 2**20
    except torch.OutOfMemoryError:
        return float("nan"), float("inf")
    return statistics.median(times[1:]), peak


def attention_rows(T: int, heads: int, groups: int, d: int, dtype, dev, reps: int) -> list[tuple]:
    from megaapo.models.qwen2_5_vl.attention import varlen_attention, varlen_backend

    lengths = sample_lengths(T, min(1.0, T / 8192))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(T, n, d, generator=g).to(dev, dtype).requires_grad_() for n in (heads, groups, groups))
    cu = torch.tensor([0] + lengths).cumsum(0).to(dev, torch.int32)
    scale = d ** -0.5

    def mask_packed():   # what packing did before: SDPA with a [T, T] boolean mask (math path with GQA)
        seg = torch.repeat_interleave(torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev))
        allow = (seg[:, None] == seg[None, :]) & torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=allow,
                                             scale=scale, enable_gqa=True)
        out.float().square().sum().backward()

    def varlen():
        varlen_attention(q, k, v, cu, max(lengths), scale).float().square().sum().backward()

    width, bounds = max(lengths), cu.tolist()

    def padded():        # the same samples as right-padded rows [n, width], causal
        qkv = [torch.stack([F.pad(t[a:b], (0, 0, 0, 0, 0, width - (b - a))) for a, b in zip(bounds, bounds[1:])])
               for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in qkv), is_causal=True, scale=scale,
                                             enable_gqa=True)
        out.float().square().sum().backward()

    kernel = varlen_backend(q, scale, groups)
    rows = []
    for name, fn, tokens in (("packed, dense mask (before)", mask_packed, T),
                             (f"packed, varlen ({kernel})", varlen, T),
                             ("padded rows, causal", padded, len(lengths) * width)):
        sec, mib = measure(fn, dev, reps)
        rows.append((T, len(lengths), name, tokens, sec, mib))
    return rows


def learner_rows(path: Path, dtype: str, budget: int, n_samples: int, reps: int) -> list[tuple]:
    """Whole train steps over the same samples, sequence_packing on and off, at the same token budget."""
    from megaapo.config import ModelConfig, OptimConfig, ParallelConfig
    from megaapo.data.packing import plan
    from megaapo.distributed import destroy, init_distributed
    from megaapo.learner import Learner
    from megaapo.supervised import nll_loss

    groups = init_distributed(1, 1)
    learner = Learner(path, groups, ModelConfig(dtype=dtype), ParallelConfig(micro_batch_tokens=budget),
                      OptimConfig(lr=1e-6))
    g = torch.Generator().manual_seed(2)
    top = min(learner.shape.vocab_size, 150000, learner.shape.image_token_id)
    lengths = sample_lengths(budget * n_samples, budget / 8192, seed=3)[:n_samples]
    samples = [learner.make_sample(torch.randint(0, top, (n,), generator=g), max(1, n // 3)) for n in lengths]
    loss = nll_loss(sum(s.response_len for s in samples))
    rows = []
    for packing in (True, False):
        learner.parallel.sequence_packing = packing
        groups_ = plan(lengths, budget, packing)
        tokens = sum(sum(lengths[i] for i in r) if packing else len(r) * max(lengths[i] for i in r)
                     for r in groups_)
        sec, mib = measure(lambda: learner.train_step(samples, loss), groups.device, reps)
        rows.append(("packed (varlen)" if packing else "padded rows", len(groups_), tokens, sec, mib))
    del learner
    destroy()
    return rows, lengths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU-sized shapes")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    gpu = torch.cuda.is_available() and not args.smoke
    dev = torch.device("cuda" if gpu else "cpu")
    if gpu:
        rows_T, shape, dtype, budget, n = [8192, 16384, 32768], (16, 2, 128), torch.bfloat16, 8192, 64
    else:
        rows_T, shape, dtype, budget, n = [1024, 2048, 4096], (4, 2, 64), torch.float32, 1024, 24
    device = torch.cuda.get_device_name() if gpu else \
        f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the start"
    attn = [r for T in rows_T for r in attention_rows(T, *shape, dtype, dev, args.reps)]
    lines = [f"device: {device}; {datetime.date.today().isoformat()}", "",
             f"Attention forward + backward, {shape[0]} heads, {shape[1]} KV heads, head_dim {shape[2]}, "
             f"{str(dtype).split('.')[-1]}:", "",
             "| row tokens | samples | layout | tokens computed | ms | peak MiB | time vs packed varlen |",
             "|---|---|---|---|---|---|---|"]
    for i, (T, ns, name, tokens, sec, mib) in enumerate(attn):
        base = attn[i - i % 3 + 1][4]
        mem = "out of memory" if mib == float("inf") else f"{mib:,.0f}"
        lines.append(f"| {T} | {ns} | {name} | {tokens:,} | {1e3 * sec:,.1f} | {mem} | {sec / base:.2f}x |")
    from megaapo.models.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        if gpu:   # Qwen2.5-VL-3B's layer, 4 of them
            path = build_tiny(Path(tmp) / "m", vocab="real", hidden_size=2048, num_layers=4, num_heads=16,
                              num_kv_heads=2, intermediate_size=11008, vision_depth=1, tie_embeddings=True,
                              dtype="bfloat16")
        else:
            path = build_tiny(Path(tmp) / "m", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
        steps, lengths = learner_rows(path, "bfloat16" if gpu else "float32", budget, n, args.reps)
    lines += ["", f"Learner train step, {n} samples of {min(lengths)}-{max(lengths)} tokens, micro_batch_tokens="
              f"{budget} ({'Qwen2.5-VL-3B layers x 4, bf16' if gpu else 'tiny model, fp32'}):", "",
              "| layout | micro-batches | tokens computed | s/step | peak MiB | time vs packed |",
              "|---|---|---|---|---|---|"]
    for name, mbs, tokens, sec, mib in steps:
        lines.append(f"| {name} | {mbs} | {tokens:,} | {sec:.3f} | {mib:,.0f} | {sec / steps[0][3]:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        doc = ROOT / "docs" / "attention.md"
        marker = f"## Measured ({'GPU' if gpu else 'CPU'}, benchmarks/packing.py{'' if gpu else ' --smoke'})"
        text = doc.read_text()
        head, _, rest = text.partition(marker)
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        doc.write_text(head.rstrip() + "\n\n" + marker + "\n\n" + table + "\n" + tail)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
