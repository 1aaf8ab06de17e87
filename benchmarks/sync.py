"""Weight-sync and rollout-engine benchmark: the transfer, bucketed vs one flat buffer; vLLM's weight-transfer
protocol vs megaapo's old sync on the same bytes; engine start; generation.

    python benchmarks/sync.py [--gb 1.0] [--buckets-mb 64,256,512] [--reps 5] [--protocol-reps 5]
                              [--skip-protocol] [--skip-engine] [--write-docs]

1. A 1 GB set of Qwen2.5-VL-3B-shaped bf16 tensors (vision blocks, then language-model layers, in HF order and
   names; embeddings left out: a 0.6 GB solo tensor would hide the bucketing) is broadcast from this process to
   one receiver process, (a) the way weight sync sends it: on CPU the gloo backend's bucket sender and stream
   (`megaapo.rollout.gloo`), on CUDA vLLM's packed NCCL producer and consumer (what its `nccl` backend runs; two
   GPUs, one per rank), and (b) as one broadcast of a single flat buffer of the same bytes. Each time runs until
   the receiver acknowledges. Ratio target <= 1.25.
2. Protocol, new vs old (CPU): a real engine (a Qwen2.5-VL of --sync-hidden x --sync-layers, fp32, ~270 MB at
   the defaults) receives the same HF state dict, (new) through `RolloutClient.send_weights`: vLLM's four phases
   over the RPC with the gloo backend, and (old) through megaapo's previous protocol (`benchmarks/legacy_sync.py`:
   the plan over the RPC, `reload_weights` in a worker extension), alternating order every repetition. Each time
   runs until every engine has loaded the weights. Target: new <= 1.10x old.
3. A real engine on the CPU demo's tiny model (configs/demo.yaml; on CUDA on a GPU of its own, placed as the
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
sys.path.insert(0, str(ROOT / "benchmarks"))   # legacy_sync (the old protocol, part 2's baseline)

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


class _Nccl:
    """A two-rank NCCL group (vLLM's PyNcclCommunicator, as its nccl backend uses), one GPU per rank."""

    def __init__(self, rank: int, port: int):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        self.device = rank_device(rank, torch.cuda.device_count())
        torch.cuda.set_device(self.device)
        pg = StatelessProcessGroup.create(host="127.0.0.1", port=port, rank=rank, world_size=2)
        self.comm = PyNcclCommunicator(pg, device=self.device)

    def broadcast(self, tensor, src: int):
        self.comm.broadcast(tensor, src=src)
        return self

    def wait(self):
        torch.cuda.synchronize(self.device)

    def close(self):
        self.comm = None


def _group(rank: int, port: int, listen=None):
    if torch.cuda.is_available():
        return _Nccl(rank, port)
    from megaapo.rollout.gloo import GlooGroup

    return GlooGroup("127.0.0.1", port, rank, 2, timeout_s=600, listen_socket=listen)


def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _order(rep: int, kinds: list) -> list:
    """The measured variants alternate direction every repetition, so a drift in machine load hits all alike."""
    return list(kinds) if rep % 2 == 0 else list(kinds)[::-1]


def _receive(g, specs: list[TensorSpec], mb: int) -> None:
    """Receive the tensors the way an engine worker does (and drop them)."""
    if isinstance(g, _Nccl):
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_consumer

        meta = ((s.name, (list(s.shape), torch.bfloat16)) for s in specs)
        packed_nccl_broadcast_consumer(meta, group=g.comm, src=0, post_unpack_func=lambda pairs: None,
                                       buffer_size_bytes=mb << 20, num_buffers=2, device=g.device)
        return
    from megaapo.rollout.gloo import BucketStream

    for _pairs in BucketStream(g, plan_buckets(specs, mb << 20)):
        pass


def _send(g, specs: list[TensorSpec], named: list, mb: int) -> None:
    """Send the tensors the way the trainer does."""
    if isinstance(g, _Nccl):
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        packed_nccl_broadcast_producer(iter(named), group=g.comm, src=0, post_iter_func=lambda item: item[1],
                                       buffer_size_bytes=mb << 20, num_buffers=2)
        return
    from megaapo.rollout.gloo import BucketSender

    BucketSender(g, mb << 20).send(plan_buckets(specs, mb << 20), named)


def receiver(port: int, gb: float, buckets_mb: list[int], reps: int) -> None:
    g = _group(1, port)
    dev = g.device if isinstance(g, _Nccl) else torch.device("cpu")
    specs = qwen3b_specs(int(gb * 2**30))
    flat_bytes = sum(s.nbytes for s in specs)
    token = torch.ones(1, device=dev)
    for rep in range(reps):
        for mb in _order(rep, ["flat"] + buckets_mb):
            g.broadcast(token, 1).wait()           # start together
            if mb == "flat":
                g.broadcast(torch.empty(flat_bytes, dtype=torch.uint8, device=dev), 0).wait()
            else:
                _receive(g, specs, mb)
            g.broadcast(token, 1).wait()           # acknowledge: everything has arrived
    g.close()


def bench_broadcast(gb: float, buckets_mb: list[int], reps: int) -> list[dict]:
    from megaapo.rollout.client import free_listen_socket

    specs = qwen3b_specs(int(gb * 2**30))
    nbytes = sum(s.nbytes for s in specs)
    listen = free_listen_socket("127.0.0.1")
    port = listen.getsockname()[1]
    if torch.cuda.is_available():
        listen.close()   # vLLM's NCCL rendezvous binds the port itself
    proc = subprocess.Popen([sys.executable, __file__, "--role", "receiver", "--port", str(port), "--gb", str(gb),
                             "--buckets-mb", ",".join(map(str, buckets_mb)), "--reps", str(reps)])
    try:
        g = _group(0, port, None if torch.cuda.is_available() else listen)
        dev = _device()
        named = [(s.name, torch.empty(s.shape, dtype=torch.bfloat16, device=dev).normal_()) for s in specs]
        flat = torch.ones(nbytes, dtype=torch.uint8, device=dev)
        token = torch.ones(1, device=dev)
        times: dict = {mb: [] for mb in ["flat"] + buckets_mb}
        for rep in range(reps):
            for mb in _order(rep, ["flat"] + buckets_mb):
                g.broadcast(token, 1).wait()
                t0 = time.perf_counter()
                if mb == "flat":
                    g.broadcast(flat, 0).wait()
                else:
                    _send(g, specs, named, mb)
                g.broadcast(token, 1).wait()
                times[mb].append(time.perf_counter() - t0)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    best = {k: min(v) for k, v in times.items()}
    how = "vLLM packed NCCL" if torch.cuda.is_available() else "gloo backend buckets"
    rows = [{"what": "one flat buffer", "buckets": 1, "tensors": len(specs), "seconds": best["flat"]}]
    for mb in buckets_mb:
        rows.append({"what": f"{how}, {mb} MB", "buckets": len(plan_buckets(specs, mb << 20)),
                     "tensors": len(specs), "seconds": best[mb]})
    for r, key in zip(rows, times):
        r["gb_s"] = nbytes / r["seconds"] / 1e9
        # Each repetition's own ratio (runs minutes apart see different load on a shared machine), then the median.
        r["ratio"] = statistics.median(t / f for t, f in zip(times[key], times["flat"]))
        r["best_ratio"] = r["seconds"] / best["flat"]
        r["bytes"] = nbytes
    return rows


def bench_protocol(work: Path, hidden: int, layers: int, bucket_mb: int, reps: int) -> dict:
    """New (vLLM's protocol, gloo backend) vs old (benchmarks/legacy_sync.py) weight sync into one real engine."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megaapo.config import load_config
    from megaapo.models.tiny import build_tiny
    from megaapo.rollout import RolloutClient
    from megaapo.rollout.source import TensorSource
    from legacy_sync import LegacySync

    model = build_tiny(work / "sync_model", hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                       num_kv_heads=2, intermediate_size=4 * hidden, dtype="float32")
    named = list(Qwen2_5_VLForConditionalGeneration.from_pretrained(model, dtype=torch.float32).state_dict().items())
    full = load_config("demo", ["rollout.num_engines=1", f"rollout.sync_bucket_mb={bucket_mb}",
                                "rollout.request_timeout_s=1200"])
    # The engine imports the old protocol's worker extension from benchmarks/.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    times: dict = {"old": [], "new": [], "old_engine": [], "new_engine": []}
    with RolloutClient(full.rollout, model, "float32", min_pixels=full.data.min_pixels,
                       max_pixels=full.data.max_pixels, log_dir=work / "protocol_logs",
                       engine_extra={"worker_extension_cls": "legacy_sync.LegacyExtension"}) as client:
        legacy = LegacySync(client, bucket_mb << 20)
        source = TensorSource(named, torch.float32)
        stats = client.send_weights(source, version=1)   # the first call also joins the transfer
        legacy.update_weights(named)
        for rep in range(reps):
            for kind in _order(rep, ["old", "new"]):
                t0 = time.perf_counter()
                if kind == "new":
                    engine_s = client.send_weights(source, version=2 + rep)["engine_load_seconds"]
                else:
                    engine_s = legacy.update_weights(named)
                times[kind].append(time.perf_counter() - t0)
                times[kind + "_engine"].append(engine_s)
        legacy.close()
    return {"bytes": stats["bytes"], "tensors": stats["tensors"], "buckets": stats["buckets"], **times}


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

        from megaapo.rollout.source import TensorSource

        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model, dtype=torch.float32)
        source = TensorSource(hf.state_dict(), client.engine_dtype)
        client.send_weights(source, version=1)     # the first one also joins the transfer
        t0 = time.perf_counter()
        stats = client.send_weights(source, version=2)
        out["sync"] = dict(stats, wall=time.perf_counter() - t0)
    return out


def tables(rows: list[dict] | None, proto: dict | None, eng: dict | None) -> str:
    lines = []
    if rows:
        lines += ["| broadcast of %.2f GB (%d bf16 tensors) | buckets | best s | GB/s | best / best flat | "
                  "time / flat (median of repetitions) |" % (rows[0]["bytes"] / 1e9, rows[0]["tensors"]),
                  "|---|---|---|---|---|---|"]
    for r in rows or []:
        lines.append(f"| {r['what']} | {r['buckets']} | {r['seconds']:.3f} | {r['gb_s']:.2f} | "
                     f"{r['best_ratio']:.2f}x | {r['ratio']:.2f}x |")
    if proto:
        old, new = proto["old"], proto["new"]
        ratios = [n / o for n, o in zip(new, old)]
        lines += [""] if lines else []
        med = statistics.median
        lines += [f"| weight sync into a real engine, {proto['bytes'] / 1e6:.0f} MB ({proto['tensors']} fp32 "
                  f"tensors, {proto['buckets']} buckets), {len(old)} repetitions | best s | median s | "
                  "median s in the engine (receive + load) |", "|---|---|---|---|",
                  f"| old: plan over the RPC, `reload_weights` in a worker extension | {min(old):.3f} | "
                  f"{med(old):.3f} | {med(proto['old_engine']):.3f} |",
                  f"| new: vLLM's four phases, gloo backend | {min(new):.3f} | {med(new):.3f} | "
                  f"{med(proto['new_engine']):.3f} |",
                  f"| new / old: median of the repetitions' ratios (best / best) | "
                  f"{med(ratios):.3f}x ({min(new) / min(old):.3f}x) | | |"]
    if eng:
        lines += ["", "| engine (demo tiny model, 1 engine) | value |", "|---|---|",
                  f"| engine start, trainer's view (spawn, import vLLM, load, profile) | {eng['start_s']:.1f} s |",
                  f"| of which `import vllm` | {eng['import_s']:.1f} s |",
                  f"| of which `vllm.LLM(...)` (load, profile, KV cache) | "
                  f"{eng['start_engine_s'] - eng['import_s']:.1f} s |",
                  f"| first generate (warm-up) | {eng['first_generate_s']:.2f} s |"]
        from megaapo.config import load_config

        r = load_config("demo").rollout
        for key, what in (("demo", f"demo step: {r.prompts_per_step} prompts x {r.n_samples} samples, "
                                   f"<= {r.max_new_tokens} new tokens"),
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
    ap.add_argument("--protocol-reps", type=int, default=5)
    ap.add_argument("--sync-hidden", type=int, default=768, help="hidden size of part 2's engine model")
    ap.add_argument("--sync-layers", type=int, default=8, help="layers of part 2's engine model")
    ap.add_argument("--sync-bucket-mb", type=int, default=64, help="rollout.sync_bucket_mb for part 2")
    ap.add_argument("--skip-broadcast", action="store_true")
    ap.add_argument("--skip-protocol", action="store_true")
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
    rows = None if args.skip_broadcast else bench_broadcast(args.gb, buckets_mb, args.reps)
    proto = eng = None
    import tempfile

    with tempfile.TemporaryDirectory(prefix="megaapo-bench-") as work:
        if not args.skip_protocol and not torch.cuda.is_available():   # the old protocol ran gloo here
            proto = bench_protocol(Path(work), args.sync_hidden, args.sync_layers, args.sync_bucket_mb,
                                   args.protocol_reps)
        if not args.skip_engine:
            eng = bench_engine(Path(work))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, gloo"
    header = (f"Command: `.venv/bin/python benchmarks/sync.py {' '.join(sys.argv[1:])}` ({device}, "
              f"{date.today().isoformat()}; load average {os.getloadavg()[0]:.1f} at the end).")
    text = header + "\n\n" + tables(rows, proto, eng)
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
