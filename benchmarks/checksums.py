"""What checkpoint integrity costs: checksums (and the non-finite check) next to the write they protect.

    python benchmarks/checksums.py [--params 0.5e9] [--repeats 3]

Two checkpoints: the CPU demo's (the tiny Qwen2.5-VL of configs/demo.yaml: policy weights, Adam state, the
warmed-up reference, RNG, written by `megaapo.checkpoint.save`; a run's dist_checkpointing checkpoint holds the
same bytes and its commit hashes them the same way, docs/checkpoints.md), and one ~0.5B-parameter bf16 weight file
(1 GB, the size of a Qwen2.5-0.5B shard). For each: the save without checksums, with them (megaapo's default,
XXH3-128), the verification before a resume, and the hashing rate of the alternatives (crc32 from zlib, blake2b and
sha256 from hashlib) on the same bytes. Files are hashed right after being written, from the page cache, as
`megaapo.checkpoint.save` does. Prints a table; the ratios are against the save measured in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import tempfile
import time
import zlib
from datetime import date
from pathlib import Path

import torch


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _hash_rate(path: Path, algo: str, repeats: int) -> float:
    """Seconds to hash the whole file with `algo` (8 MiB reads)."""
    from megaapo import integrity

    def run():
        if algo == "xxh3_128":
            return integrity.file_checksum(path)
        if algo == "crc32":
            crc = 0
            with open(path, "rb") as f:
                while chunk := f.read(8 << 20):
                    crc = zlib.crc32(chunk, crc)
            return crc
        h = hashlib.new(algo)
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        return h.hexdigest()
    return _median_s(run, repeats)


def demo_shards(tmp: Path) -> dict:
    """The demo's checkpoint contents (policy with Adam state, reference, RNG) as per-rank shards."""
    from megaapo import checkpoint as ckpt
    from megaapo.config import load_config
    from megaapo.distributed import init_distributed
    from megaapo.learner import Learner
    from megaapo.models.tiny import build_tiny

    cfg = load_config("demo")
    t = cfg.model.tiny
    model = build_tiny(tmp / "tiny", vocab=t.vocab, hidden_size=t.hidden_size, num_layers=t.num_layers,
                       num_heads=t.num_heads, num_kv_heads=t.num_kv_heads, intermediate_size=t.intermediate_size,
                       vision_depth=t.vision_depth, vision_hidden_size=t.vision_hidden_size)
    groups = init_distributed(1, 1, "gloo")
    policy = Learner(model, groups, cfg.model, cfg.parallel, cfg.optim, total_steps=10)
    reference = Learner(model, groups, cfg.model, cfg.parallel, None)
    for p in policy.optim.params:   # Adam state as after a step (both moments present)
        p.grad = torch.randn_like(p) * 1e-3
    policy.optim.step(1e-4)
    def weights(learner):
        return {k: v.detach() for k, v in learner.model.state_dict().items() if not k.endswith("_extra_state")}

    return {"model": weights(policy), "optim": {"optimizer": policy.optim.optimizer.state_dict()},
            "rng": ckpt.capture_rng(), "ref": weights(reference)}


def measure(name: str, shards: dict, root: Path, repeats: int) -> list[tuple]:
    from megaapo import checkpoint as ckpt
    from megaapo import integrity

    meta = {"train_state": ckpt.TrainState(step=1).to_dict()}
    plain = _median_s(lambda: ckpt.save(root / "plain", 1, shards, meta, 1, checksum=False), repeats)
    summed = _median_s(lambda: ckpt.save(root / "summed", 1, shards, meta, 1, checksum=True), repeats)
    path = root / "summed" / "step_000001"
    verify = _median_s(lambda: integrity.verify(path), repeats)
    nonfinite = _median_s(lambda: integrity.nonfinite(shards), repeats)
    size = sum(f.stat().st_size for f in path.iterdir())
    biggest = max(path.iterdir(), key=lambda f: f.stat().st_size)
    rows = [(name, "save, checksums off", plain, size, 1.0),
            (name, "save, checksums on (default)", summed, size, summed / plain),
            (name, "verify before resume (xxh3_128)", verify, size, verify / plain),
            (name, "non-finite check before save", nonfinite, size, nonfinite / plain)]
    for algo in ("xxh3_128", "crc32", "blake2b", "sha256"):
        s = _hash_rate(biggest, algo, repeats) * size / biggest.stat().st_size
        rows.append((name, f"hash every file: {algo}", s, size, s / plain))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=0.5e9)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="megaapo-checksums-") as d:
        tmp = Path(d)
        rows += measure("demo checkpoint", demo_shards(tmp), tmp / "demo", args.repeats)
        big = {"model": {"weight": torch.randn(int(args.params), dtype=torch.bfloat16)}}
        rows += measure(f"{args.params / 1e9:g}B bf16 params", big, tmp / "big", args.repeats)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {date.today()}, "
          f"median of {args.repeats}")
    print("| checkpoint | operation | seconds | MB/s | vs save |")
    print("|---|---|---|---|---|")
    for name, op, s, size, ratio in rows:
        print(f"| {name} ({size / 2**20:.1f} MiB) | {op} | {s:.3f} | {size / 2**20 / s:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
