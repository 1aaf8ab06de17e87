"""Checkpoint save and load: megaapo's old per-rank format vs megatron-core dist_checkpointing (sync and async).

    python benchmarks/checkpoint.py                      # the demo model and a ~0.5B Qwen2.5-VL-shaped model
    python benchmarks/checkpoint.py --models demo        # only the demo model (seconds)
    python benchmarks/checkpoint.py --write-docs         # also write the table to docs/checkpoints.md

One trainer process (TP = PP = DP = 1) on CPU, `optim.impl=torch` (the CPU default): a checkpoint holds the weights,
AdamW's two moments (fp32) and, for a bf16 model, the fp32 master weights. The optimizer state is filled with random
values as after some updates (no training step is run: only the I/O is measured). Per format:
  save blocks   how long the training loop is stopped by `save` (async: planning, the fork that snapshots the state)
  total write   until the checkpoint is complete and committed (visible to a resume)
  size          bytes on disk
  load          a fresh learner reading it and applying it (page cache warm: it was just written)
"old" is format 1 (each rank's shards as safetensors + torch.save, as megaapo wrote them before dist_checkpointing);
"new" is format 2 (megaapo.dist_checkpoint). The first new-format save of a process also starts megatron's writer
result queue (a spawned manager process): reported as "first save blocks"; the table's save is the second one.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    # the demo preset's model (configs/demo.yaml)
    "demo": dict(dtype="float32", shape=dict(vocab="small", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                                             intermediate_size=256, vision_depth=2, vision_hidden_size=64)),
    # Qwen2.5-0.5B's language model (real vocabulary, tied embeddings) with a small vision tower, in bf16
    "qwen0.5b": dict(dtype="bfloat16", shape=dict(vocab="real", tie_embeddings=True, hidden_size=896, num_layers=24,
                                                   num_heads=14, num_kv_heads=2, intermediate_size=4864,
                                                   vision_depth=2, vision_hidden_size=128)),
}


def learner_for(path: Path, groups, dtype: str, load_weights: bool = True):
    from megaapo.config import ModelConfig, OptimConfig, ParallelConfig
    from megaapo.learner import Learner

    return Learner(path, groups, ModelConfig(dtype=dtype), ParallelConfig(), OptimConfig(impl="torch"),
                   load_weights=load_weights)


def fill_optimizer(learner) -> None:
    """AdamW state as after a few updates, without running them (random moments, step 3)."""
    g = torch.Generator().manual_seed(0)
    opt = learner.optim.optimizer
    for q in learner.optim.master or learner.optim.params:
        opt.state[q] = {"step": torch.tensor(3.0), "exp_avg": torch.randn(q.shape, generator=g) * 1e-3,
                        "exp_avg_sq": torch.rand(q.shape, generator=g) * 1e-6}


def old_shards(learner) -> dict:
    from megaapo import checkpoint as ckpt

    model = {k: v.detach() for k, v in learner.model.state_dict().items() if not k.endswith("_extra_state")}
    optim = {"impl": "torch", "optimizer": learner.optim.optimizer.state_dict()}
    if learner.optim.master is not None:
        optim["master"] = [m.detach() for m in learner.optim.master]
    return {"model": model, "optim": {"optimizer": optim, "lr_step": 3, "version": 3}, "rng": ckpt.capture_rng()}


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_model(name: str, spec: dict, work: Path, groups) -> list[dict]:
    from megaapo import checkpoint as ckpt
    from megaapo import dist_checkpoint as dckpt
    from megaapo import legacy_checkpoint
    from megaapo.models.tiny import build_tiny

    path = build_tiny(work / name / "model", **spec["shape"])
    dtype = spec["dtype"]
    learner = learner_for(path, groups, dtype)
    fill_optimizer(learner)
    params = sum(p.numel() for p in learner.model.parameters())
    meta = {"train_state": {"step": 3}, "contents": ["policy"]}
    rows = []

    t0 = time.perf_counter()
    old = ckpt.save(work / name / "old", 3, old_shards(learner), meta)
    t_old = time.perf_counter() - t0
    rows.append(dict(model=name, params=params, format="old (format 1)", blocks=t_old, total=t_old, size=du(old)))

    for mode in ("sync", "async"):
        saver = dckpt.Checkpointer(work / name / mode, groups, async_save=mode == "async", keep_last=1)
        first = None
        for step in (1, 2):   # the first save of a process starts megatron's writer queue
            t0 = time.perf_counter()
            saver.save(step, {"policy": learner.sharded_state_dict()}, meta, hf_dir=learner.hf_dir)
            blocks = time.perf_counter() - t0
            saver.wait()
            total = time.perf_counter() - t0
            first = blocks if first is None else first
        saver.close()
        rows.append(dict(model=name, params=params, format=f"new, {mode}", blocks=blocks, total=total,
                         size=du(work / name / mode / "step_000002"), first=first))
    del learner
    gc.collect()

    fresh = learner_for(path, groups, dtype, load_weights=False)
    t0 = time.perf_counter()
    legacy_checkpoint.load(old, fresh)
    rows[0]["load"] = time.perf_counter() - t0
    del fresh
    gc.collect()
    for row, mode in zip(rows[1:], ("sync", "async")):
        fresh = learner_for(path, groups, dtype, load_weights=False)
        t0 = time.perf_counter()
        step_dir = work / name / mode / "step_000002"
        loaded, _ = dckpt.read(step_dir, {"policy": fresh.sharded_state_dict(is_loading=True)}, groups)
        fresh.load_sharded_state_dict(loaded["policy"])
        row["load"] = time.perf_counter() - t0
        del fresh, loaded
        gc.collect()
    shutil.rmtree(work / name, ignore_errors=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | parameters | format | save blocks the step | total write | size | load | first save blocks |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        first = f"{r['first']:.2f} s" if "first" in r else "-"
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['format']} | {r['blocks']:.2f} s | "
                     f"{r['total']:.2f} s | {r['size'] / 2**20:.1f} MiB | {r['load']:.2f} s | {first} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    from megaapo.distributed import destroy, init_distributed

    groups = init_distributed(1, 1)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name in args.models:
            rows += bench_model(name, MODELS[name], Path(tmp), groups)
    destroy()
    text = table(rows)
    where = (f"{platform.node()}: {os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}, "
             f"{datetime.date.today().isoformat()}")
    print(text)
    print(where)
    if args.write_docs:
        docs = ROOT / "docs" / "checkpoints.md"
        body = docs.read_text() if docs.is_file() else ""
        marker = "<!-- benchmark table -->"
        block = f"{marker}\n{text}\n\n{where}\n{marker}"
        if body.count(marker) == 2:
            head, _, rest = body.partition(marker)
            _, _, tail = rest.partition(marker)
            docs.write_text(head + block + tail)
        else:
            docs.write_text(body + "\n" + block + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
