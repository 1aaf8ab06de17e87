"""Weight-sync and rollout-engine benchmark: bucketed broadcast vs one flat buffer; engine start; generation.

    python benchmarks/sync.py [--gb 1.0] [--buckets-mb 64,256,512] [--reps 5] [--skip-engine] [--write-docs]

1. A 1 GB set of Qwen2.5-VL-3B-shaped bf16 tensors (vision blocks, then language-model layers, in HF order and
   names; embeddings left out: a 0.6 GB solo tensor would hide the bucketing) is broadcast from this process to
   one receiver process over the same sync group the trainer uses (gloo on CPU; NCCL on CUDA, which needs two
   GPUs, one per rank), (a) with `WeightSender` in buckets, received by the engine worker's own bucket stream,
   and (b) as one broadcast of a single flat buffer of the same bytes. Each time runs until the receiver
   acknowledges. Ratio target <= 1.25.
2. A real engine on the CPU demo's tiny model (configs/demo.yaml; on CUDA on a GPU of its own, placed as the
   trainer places its engines): start time, then generation throughput at the demo's settings
   (16 prompts x 8 samples x 12 new tokens, 84x84 images) and with 64 forced tokens per sample.
With --write-docs the tables replace the measured section of docs/rollout.md (with device and date).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megaapo.rollout.buckets import TensorSpec, plan_buckets  # noqa: E402

# Qwen2.5-VL-3B: vision hidden 1280, MLP 3420, depth 32; text hidden 2048, MLP 11008, 16 heads, 2 KV heads of 128.
V_H, V_I, T_H, T_I, KV = 1280, 3420, 2048, 11008, 256


def qwen3b_specs(limit_bytes: int) -> list[TensorSpec]:
    def vision_block(i):
        p = f"model.visual.blocks.{i}."
        return [(p + "norm1.weight", (V_H,)), (p + "norm2.weight", (V_H,)), (p + "attn.qkv.weight", (3 * V_H, V_H)),
                (p + "attn.qkv.bias", (3 * V_H,)), (p + "attn.proj.weight", (V_H, V_H)), (p + "attn.proj.bias", (V_H,)),
                (p + "mlp.gate_proj.weight", (V_I, V_H)), (p + "mlp.gate_proj.bias", (V_I,)),
                (p + "mlp.up_proj.weight", (V_I, V_H)), (p + "mlp.up_proj.bias", (V_I,)),
                (p + "mlp.down_proj.weight", (V_H, V_I)), (p + "mlp.down_proj.bias", (V_H,))]

    def text_layer(i):
        p = f"model.language_model.layers.{i}."
        return [(p + "input_layernorm.weight", (T_H,)), (p + "self_attn.q_proj.weight", (T_H, T_H)),
                (p + "self_attn.q_proj.bias", (T_H,)), (p + "self_attn.k_proj.weight", (KV, T_H)),
                (p + "self_attn.k_proj.bias", (KV,)), (p + "self_attn.v_proj.weight", (KV, T_H)),
                (p + "self_attn.v_proj.bias", (KV,)), (p + "self_attn.o_proj.weight", (T_H, T_H)),
                (p + "post_attention_layernorm.weight", (T_H,)), (p + "mlp.gate_proj.weight", (T_I, T_H)),
                (p + "mlp.up_proj.weight", (T_I, T_H)), (p + "mlp.down_proj.weight", (T_H, T_I))]

    shapes = [("model.visual.patch_embed.proj.weight", (V_H, 3, 2, 14, 14))]
    for i in range(16):
        shapes += vision_block(i)
    for i in range(36):
        shapes += text_layer(i)
    specs, total = [], 0
    for name, shape in shapes:
        s = TensorSpec(name, shape, "bfloat16")
        if total + s.nbytes > limit_bytes:
            break
        specs.append(s)
        total += s.nbytes
    return specs


def rank_device(rank: int, cuda_devices: int) -> torch.device:
    """One device per rank of the sync group: NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), so on
    CUDA the benchmark needs two GPUs (sender on cuda:0, receiver on cuda:1); without CUDA both ranks run on CPU."""
    if cuda_devices == 0:
        return torch.device("cpu")
    if cuda_devices < 2:
        raise SystemExit(f"benchmarks/sync.py needs two GPUs on CUDA (one per rank of the NCCL sync group); this "
                         f"machine shows {cuda_devices}. Run it on a 2-GPU machine, or on CPU (CUDA_VISIBLE_DEVICES=)")
    return torch.device("cuda", rank)


def _group(rank: int, port: int, listen=None):
    from megaapo.rollout.group import SyncGroup

    device = rank_device(rank, torch.cuda.device_count())
    return SyncGroup("127.0.0.1", port, rank, 2, device, timeout_s=600, listen_socket=listen)


def _order(rep: int, buckets_mb: list[int]) -> list:
    """Flat and bucketed runs alternate direction every repetition, so a drift in machine load hits both alike."""
    order = ["flat"] + buckets_mb
    return order if rep % 2 == 0 else order[::-1]


def receiver(port: int, gb: float, buckets_mb: list[int], reps: int) -> None:
    from megaapo.rollout.worker import _BucketStream

    g = _group(1, port)
    specs = qwen3b_specs(int(gb * 2**30))
    flat_bytes = sum(s.nbytes for s in specs)
    token = torch.ones(1, device=g.device)
    for rep in range(reps):
        for mb in _order(rep, buckets_mb):
            g.broadcast(token, 1).wait()           # start together
            if mb == "flat":
                g.broadcast(torch.empty(flat_bytes, dtype=torch.uint8, device=g.device), 0).wait()
            else:
                for _name, _t in _BucketStream(g, plan_buckets(specs, mb << 20), g.device, False):
                    pass
            g.broadcast(token, 1).wait()           # acknowledge: everything has arrived
    g.close()


def bench_broadcast(gb: float, buckets_mb: list[int], reps: int) -> list[dict]:
    from megaapo.rollout.group import free_listen_socket
    from megaapo.rollout.sync import WeightSender

    specs = qwen3b_specs(int(gb * 2**30))
    nbytes = sum(s.nbytes for s in specs)
    listen = free_listen_socket("127.0.0.1")
    port = listen.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--role", "receiver", "--port", str(port), "--gb", str(gb),
                             "--buckets-mb", ",".join(map(str, buckets_mb)), "--reps", str(reps)])
    try:
        g = _group(0, port, listen)
        named = [(s.name, torch.empty(s.shape, dtype=torch.bfloat16, device=g.device).normal_()) for s in specs]
        flat = torch.ones(nbytes, dtype=torch.uint8, device=g.device)
        token = torch.ones(1, device=g.device)
        senders = {mb: WeightSender(g, mb << 20) for mb in buckets_mb}
        times: dict = {mb: [] for mb in ["flat"] + buckets_mb}
        for rep in range(reps):
            for mb in _order(rep, buckets_mb):
                g.broadcast(token, 1).wait()
                t0 = time.perf_counter()
                if mb == "flat":
                    g.broadcast(flat, 0).wait()
                else:
                    senders[mb].send(senders[mb].plan(specs), named)
                g.broadcast(token, 1).wait()
                times[mb].append(time.perf_counter() - t0)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    best = {k: min(v) for k, v in times.items()}
    rows = [{"what": "one flat buffer", "buckets": 1, "tensors": len(specs), "seconds": best["flat"]}]
    for mb in buckets_mb:
        rows.append({"what": f"bucketed, {mb} MB buckets", "buckets": len(plan_buckets(specs, mb << 20)),
                     "tensors": len(specs), "seconds": best[mb]})
    for r, key in zip(rows, times):
        r["gb_s"] = nbytes / r["seconds"] / 1e9
        # Each repetition's own ratio (runs minutes apart see different load on a shared machine), then the median.
        r["ratio"] = statistics.median(t / f for t, f in zip(times[key], times["flat"]))
        r["best_ratio"] = r["seconds"] / best["flat"]
        r["bytes"] = nbytes
    return rows


def bench_engine(work: Path) -> dict:
    import random

    from megaapo.config import load_config
    from megaapo.data.prompts import INSTRUCTIONS
    from megaapo.data.synth import task_count
    from megaapo.models.tiny import build_tiny
    from megaapo.rollout import RolloutClient, SamplingSpec

    cfg = load_config("demo")
    t = cfg.model.tiny
    model = build_tiny(work / "demo_model", vocab=t.vocab, hidden_size=t.hidden_size, num_layers=t.num_layers,
                       num_heads=t.num_heads, num_kv_heads=t.num_kv_heads, intermediate_size=t.intermediate_size,
                       vision_depth=t.vision_depth, vision_hidden_size=t.vision_hidden_size, dtype=cfg.model.dtype)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(0)
    prompts = []
    for _ in range(cfg.rollout.prompts_per_step):
        p = task_count(rng, 2, cfg.data.synth.image_size)
        msgs = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": INSTRUCTIONS["r1"].format(question=p.question)}]}]
        prompts.append((tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), [p.image]))
    out: dict = {}
    t0 = time.perf_counter()
    with RolloutClient(cfg.rollout, model, cfg.model.dtype, min_pixels=cfg.data.min_pixels,
                       max_pixels=cfg.data.max_pixels, log_dir=work / "logs") as client:
        out["start_s"] = time.perf_counter() - t0
        out["start_engine_s"] = client.engines[0].info["start_seconds"]
        out["import_s"] = client.engines[0].info["import_seconds"]
        demo = SamplingSpec.from_config(cfg.rollout)
        t0 = time.perf_counter()
        client.generate(prompts, demo)
        out["first_generate_s"] = time.perf_counter() - t0
        for key, sampling in (("demo", demo), ("forced64", SamplingSpec(n=8, max_new_tokens=64, ignore_eos=True))):
            best = None
            for _ in range(3):
                t0 = time.perf_counter()
                rs = client.generate(prompts, sampling)
                dt = time.perf_counter() - t0
                best = dt if best is None or dt < best else best
            out[key] = {"seconds": best, "tokens": sum(len(r.token_ids) for r in rs), "samples": len(rs)}
        from transformers import Qwen2_5_VLForConditionalGeneration

        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model, dtype=torch.float32)
        client.update_weights(hf.state_dict().items(), version=1)     # first one also forms the group
        t0 = time.perf_counter()
        stats = client.update_weights(hf.state_dict().items(), version=2)
        out["sync"] = dict(stats, wall=time.perf_counter() - t0)
    return out


def tables(rows: list[dict], eng: dict | None) -> str:
    lines = ["| broadcast of %.2f GB (%d bf16 tensors) | buckets | best s | GB/s | best / best flat | "
             "time / flat (median of repetitions) |" % (rows[0]["bytes"] / 1e9, rows[0]["tensors"]),
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['buckets']} | {r['seconds']:.3f} | {r['gb_s']:.2f} | "
                     f"{r['best_ratio']:.2f}x | {r['ratio']:.2f}x |")
    if eng:
        lines += ["", "| engine (demo tiny model, 1 engine) | value |", "|---|---|",
                  f"| engine start, trainer's view (spawn, import vLLM, load, profile) | {eng['start_s']:.1f} s |",
                  f"| of which `import vllm` | {eng['import_s']:.1f} s |",
                  f"| of which `vllm.LLM(...)` (load, profile, KV cache) | "
                  f"{eng['start_engine_s'] - eng['import_s']:.1f} s |",
                  f"| first generate (warm-up) | {eng['first_generate_s']:.2f} s |"]
        for key, what in (("demo", "demo step: 16 prompts x 8 samples, <= 12 new tokens"),
                          ("forced64", "16 prompts x 8 samples x 64 forced tokens")):
            e = eng[key]
            lines.append(f"| {what} | {e['seconds']:.2f} s, {e['tokens']} tokens, "
                         f"{e['tokens'] / e['seconds']:.0f} tok/s |")
        s = eng["sync"]
        lines.append(f"| weight update of the demo model ({s['bytes'] / 1e6:.1f} MB, {s['buckets']} bucket(s)) | "
                     f"{s['wall'] * 1e3:.0f} ms (engine load {s['engine_load_seconds'] * 1e3:.0f} ms) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--buckets-mb", default="64,256,512")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--role", default="sender", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    buckets_mb = [int(x) for x in args.buckets_mb.split(",")]
    from megaapo.rollout.types import apply_engine_env

    apply_engine_env()
    if args.role == "receiver":
        receiver(args.port, args.gb, buckets_mb, args.reps)
        return
    rank_device(0, torch.cuda.device_count())   # says so before anything starts if it lacks a second GPU
    rows = bench_broadcast(args.gb, buckets_mb, args.reps)
    eng = None
    if not args.skip_engine:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="megaapo-bench-") as work:
            eng = bench_engine(Path(work))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, gloo"
    header = (f"Command: `.venv/bin/python benchmarks/sync.py --gb {args.gb} --buckets-mb {args.buckets_mb}` "
              f"({device}, {date.today().isoformat()}; {args.reps} repetitions).")
    text = header + "\n\n" + tables(rows, eng)
    print(text)
    if args.write_docs:
        doc = ROOT / "docs" / "rollout.md"
        body = doc.read_text()
        new = re.sub(r"(<!-- bench:start -->\n).*?(\n<!-- bench:end -->)", lambda m: m.group(1) + text + m.group(2),
                     body, flags=re.S)
        if new == body and text not in body:
            raise SystemExit(f"{doc} has no <!-- bench:start --> ... <!-- bench:end --> section to replace")
        doc.write_text(new)
        print(f"wrote {doc}")


if __name__ == "__main__":
    main()
