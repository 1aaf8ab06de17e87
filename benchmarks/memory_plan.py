"""The memory plan against a measured step: `megaapo plan`'s simulated peak vs the allocator's own, same calls.

    python benchmarks/memory_plan.py                 # GPU: 3B shapes, random weights, bf16 (three steps, see cases)
    python benchmarks/memory_plan.py --cases "gpu check" --write-docs   # the GPU check's step (~30 s on an H100)
    python benchmarks/memory_plan.py --smoke         # CPU: a small model, plan vs the CPU allocator's peak (the tests)
    python benchmarks/memory_plan.py --write-docs    # also write the table into docs/memory.md
    python benchmarks/memory_plan.py --presets 3B --write-docs    # the presets' plans (titles with "3B") into the docs

Each case traces one learner step with fake tensors (`megaapo.memory.trace.trace_rank`, in a spawned process, as
`megaapo plan` does) and then runs the very same calls (`run_step`: build the policy and reference learners,
reference and old-policy log-probs, the RL train step with its optimizer step) on real tensors in this process.
GPU: the measured peak is `torch.cuda.max_memory_allocated`; the run also reports the caching allocator's reserved
peak and the memory outside PyTorch (CUDA context, cuBLAS, NCCL), the two margins the plan adds by estimate.
CPU: the measured peak is that of c10's CPU allocator, summed from the profiler's allocation events (every tensor
allocation and free, kernels' internal buffers included); RSS would also count the Python heap, glibc's free lists
and pages the allocator has not touched yet, none of which the plan is about. The CPU plan traces the CPU paths
(`--target cpu`), so the comparison measures the simulator itself; the GPU path's stand-ins are measured on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 1 << 30
SMOKE_MODEL = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=704,
                   vision_depth=2, vision_hidden_size=64)
SMOKE_STEP = ["data.max_prompt_tokens=256", "rollout.max_new_tokens=256", "parallel.micro_batch_tokens=1024",
              "rollout.prompts_per_step=4", "rollout.n_samples=2", "algo.updates_per_batch=2",
              "algo.kl_coef=0.001", "algo.old_logprob=learner", "data.max_pixels=50176", "model.dtype=float32"]
# the learner benchmark's step (benchmarks/learner.py): 4 sequences of 4096 tokens, one per micro-batch, no reference
LEARNER_STEP = ["rollout.max_images_per_prompt=0", "data.max_prompt_tokens=16", "rollout.max_new_tokens=4080",
                "parallel.micro_batch_tokens=4096", "rollout.prompts_per_step=1", "rollout.n_samples=4",
                "algo.updates_per_batch=1", "algo.kl_coef=0", "model.dtype=bfloat16", "model.recompute=selective"]
# ... and its model, benchmarks/learner.py's SHAPE_3B: Qwen2.5-VL-3B's language model with a 2-block vision tower
LEARNER_MODEL = ["model.path=", "model.tiny.vocab=real", "model.tiny.hidden_size=2048", "model.tiny.num_layers=36",
                 "model.tiny.num_heads=16", "model.tiny.num_kv_heads=2", "model.tiny.intermediate_size=11008",
                 "model.tiny.vision_depth=2", "model.tiny.vision_hidden_size=128", "model.tiny.tie_embeddings=true"]
# an RL step with everything: the real 3B vision tower and a 1280-token image per sample, the reference model,
# old-policy log-probs (two updates per batch), 2 x 2048 tokens; 12 of the 36 layers so that it fits one GPU
RL_STEP = ["data.max_prompt_tokens=1536", "rollout.max_new_tokens=512", "parallel.micro_batch_tokens=2048",
           "rollout.prompts_per_step=2", "rollout.n_samples=2", "algo.updates_per_batch=2",
           "algo.old_logprob=learner", "model.dtype=bfloat16", "model.recompute=selective"]


# the GPU check's case (benchmarks/gpu_check.py, a 50 s step): every part of the GPU path in a model that traces in
# seconds: Qwen2.5-VL-3B's width and vocabulary (the fused log-prob workspace at its real size) with 4 layers and a
# 2-block vision tower, 2 packed samples of 4096 tokens with a 256-token image each, reference model, megatron optimizer
CHECK_MODEL = dict(hidden_size=2048, num_layers=4, num_heads=16, num_kv_heads=2, intermediate_size=11008,
                   vision_depth=2, vision_hidden_size=128, tie_embeddings=True)
CHECK_STEP = ["data.max_prompt_tokens=1024", "rollout.max_new_tokens=3072", "parallel.micro_batch_tokens=4096",
              "rollout.prompts_per_step=1", "rollout.n_samples=2", "rollout.max_images_per_prompt=1",
              "data.max_pixels=200704", "algo.updates_per_batch=1", "algo.kl_coef=0.001", "model.dtype=bfloat16",
              "model.recompute=selective", "parallel.sequence_packing=true", "optim.impl=megatron"]


def cases(smoke: bool) -> list:
    """(name, config, HF config, target, (tp, pp, dp))."""
    from megaapo.config import load_config
    from megaapo.models.qwen2_5_vl.published import published_config
    from megaapo.models.tiny import tiny_config

    if smoke:
        hf = tiny_config(1024, **SMOKE_MODEL)
        step = "1 image, reference + old log-probs"
        out = [(f"small model, {impl} optimizer, {step}", load_config("demo", SMOKE_STEP + [f"optim.impl={impl}"]), hf,
                "cpu", (1, 1, 1)) for impl in ("torch", "megatron")]
        for tp, pp, dp in ((1, 2, 1), (2, 1, 1), (1, 1, 2)):   # two gloo processes, each measured
            layout = [f"parallel.tp={tp}", f"parallel.pp={pp}", "optim.impl=megatron"]
            out.append((f"small model, megatron optimizer, tp={tp} pp={pp} dp={dp}, {step}",
                        load_config("demo", SMOKE_STEP + layout), hf, "cpu", (tp, pp, dp)))
        return out
    lm = tiny_config(151936, hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, intermediate_size=11008,
                     vision_depth=2, vision_hidden_size=128, tie_embeddings=True)
    rl = published_config("3b")
    rl.text_config.num_hidden_layers = 12
    check = tiny_config(151936, **CHECK_MODEL)
    return [("gpu check: 3B width and vocabulary, 4 layers, 2 x 4096 tokens packed with an image each, reference",
             load_config("apo_view_r1_3b", CHECK_STEP), check, "cuda", (1, 1, 1)),
            ("the learner benchmark's step: 3B language model, 4 x 4096 tokens, megatron optimizer",
             load_config("apo_view_r1_3b", LEARNER_STEP), lm, "cuda", (1, 1, 1)),
            ("RL step: 3B vision tower + 12 layers, 2 x 2048 tokens with an image each, reference, old log-probs",
             load_config("apo_view_r1_3b", RL_STEP), rl, "cuda", (1, 1, 1))]


def measure(cfg, hf_cfg, target: str) -> dict:
    """Run the traced calls on real tensors in this process (world of one); the allocator's peak (and, on GPU, its
    margins)."""
    from megaapo.distributed import init_distributed
    from megaapo.memory.trace import build_samples, run_step, step_shape

    groups = init_distributed(1, 1, "nccl" if target == "cuda" else "gloo")
    samples = build_samples(hf_cfg, step_shape(cfg, groups.dp_size, 1))
    # measured with transformers' own window-by-window vision attention, which the plan replaces by one call
    if target != "cuda":
        return {"peak": _cpu_peak(lambda: run_step(cfg, hf_cfg, groups, samples, target, one_call_vision=False))}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_step(cfg, hf_cfg, groups, samples, target, one_call_vision=False)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"peak": torch.cuda.max_memory_allocated() - base, "reserved": torch.cuda.max_memory_reserved(),
            "outside": (total - free) - torch.cuda.memory_reserved()}


def measure_ranks(cfg, hf_cfg, layout) -> dict:
    """CPU, several gloo processes: each rank's allocator peak -> {(pp stage, tp rank, dp rank): bytes}."""
    import json
    import tempfile

    from megaapo.distributed import spawn

    tp, pp, dp = layout
    with tempfile.TemporaryDirectory() as d:
        spawn(_rank_worker, tp * pp * dp, cfg, hf_cfg, layout, d)
        found = [json.loads(f.read_text()) for f in Path(d).glob("rank*.json")]
    return {tuple(r["where"]): r["peak"] for r in found}


def _rank_worker(rank, world, port, cfg, hf_cfg, layout, out_dir):
    import json

    from megaapo.distributed import init_distributed, set_rank_env
    from megaapo.memory.trace import build_samples, run_step, step_shape

    set_rank_env(rank, world, port)
    tp, pp, dp = layout
    groups = init_distributed(tp, pp, "gloo")
    samples = build_samples(hf_cfg, step_shape(cfg, dp, pp))
    peak = _cpu_peak(lambda: run_step(cfg, hf_cfg, groups, samples, "cpu", one_call_vision=False))
    where = [groups.pp_rank, groups.tp_rank, groups.dp_rank]
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"where": where, "peak": peak}))


def _cpu_peak(fn) -> int:
    """Peak of the bytes c10's CPU allocator holds while fn runs, relative to its start."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    held = peak = 0
    for _, n in sorted(events, key=lambda x: x[0]):
        held += n
        peak = max(peak, held)
    return peak


def run(smoke: bool, only: tuple = ()) -> list[dict]:
    """One row per traced rank: the plan's peak, the measured one, the error. only: cases whose name contains one
    of these strings (all by default)."""
    from megaapo.memory.plan import stages_to_trace, trace_jobs
    from megaapo.memory.trace import step_shape

    todo = [c for c in cases(smoke) if not only or any(o in c[0] for o in only)]
    if not todo:
        raise SystemExit(f"no case matches {only}: {[c[0] for c in cases(smoke)]}")
    jobs = [(cfg, hf, tp, pp, dp, stage, step_shape(cfg, dp, pp), target)
            for _, cfg, hf, target, (tp, pp, dp) in todo for stage in stages_to_trace(pp)]
    # traced in spawned CPU processes, as `megaapo plan` does; on a GPU while this process measures (CUDA is
    # initialised first: the tracer hides the GPU from its workers through CUDA_VISIBLE_DEVICES)
    if not smoke:
        torch.cuda.init()
    with ThreadPoolExecutor(1) as pool:
        traced = pool.submit(trace_jobs, jobs) if not smoke else None
        measured = [measure_case(cfg, hf_cfg, target, layout) for _, cfg, hf_cfg, target, layout in todo]
        traces = iter(traced.result() if traced else trace_jobs(jobs))
    rows = []
    for (name, cfg, hf_cfg, target, (tp, pp, dp)), m_case in zip(todo, measured):
        for t in [next(traces) for _ in stages_to_trace(pp)]:
            m = m_case[(t.stage, 0, 0)]
            label = name if pp == 1 else f"{name}, stage {t.stage}"
            rows.append({"case": label, "plan": t.peak, "phase": t.peak_phase, "trace_s": t.seconds, **m,
                         "error": t.peak / m["peak"] - 1})
    return rows


def measure_case(cfg, hf_cfg, target: str, layout) -> dict:
    """{(pp stage, tp rank, dp rank): measured} of one case: in this process for one rank, else gloo processes."""
    if layout == (1, 1, 1):
        return {(0, 0, 0): measure(cfg, hf_cfg, target)}
    return {k: {"peak": v} for k, v in measure_ranks(cfg, hf_cfg, layout).items()}


def table(rows: list[dict], smoke: bool) -> str:
    """The rows as markdown; on GPU with what the plan's two margins stand for, measured."""
    from megaapo.memory.plan import CONTEXT, FRAGMENTATION

    device = "CPU (c10 allocator, profiler events)" if smoke else torch.cuda.get_device_name()
    unit, div = ("MiB", 1 << 20) if smoke else ("GiB", GiB)
    gpu = "" if smoke else " reserved GiB | reserved / allocated - 1 | outside PyTorch GiB |"
    lines = [f"device: {device}; {datetime.date.today().isoformat()}", "",
             f"| case | plan peak {unit} | measured peak {unit} | plan error | traced in s |{gpu}",
             "|---|---|---|---|---|" + ("" if smoke else "---|---|---|")]
    for r in rows:
        extra = "" if smoke else (f" {r['reserved'] / GiB:.2f} | {100 * (r['reserved'] / r['peak'] - 1):.1f}% | "
                                  f"{r['outside'] / GiB:.2f} |")
        lines.append(f"| {r['case']} | {r['plan'] / div:.1f} | {r['peak'] / div:.1f} | {100 * r['error']:+.2f}% | "
                     f"{r['trace_s']:.0f} |{extra}")
    if not smoke:
        lines += ["", f"The plan's margins: fragmentation {FRAGMENTATION:.0%} of the peak (reserved / allocated - 1 "
                      f"above), CUDA context {CONTEXT / GiB:.0f} GiB (outside PyTorch above)."]
    return "\n".join(lines)


def write_docs(text: str, marker: str, after: str = "") -> None:
    """Replace the section under the heading `marker` in docs/memory.md (up to the next heading of its level or
    above); a missing section is added after the section `after` (or at the end)."""
    import re

    doc = ROOT / "docs" / "memory.md"
    body = doc.read_text() if doc.exists() else ""
    level = len(marker) - len(marker.lstrip("#"))
    heading = re.compile(r"^#{1,%d} " % level, re.MULTILINE)
    if marker + "\n" not in body and after and after + "\n" in body:
        start = body.index(after + "\n") + len(after) + 1
        nxt = re.compile(r"^#{1,%d} " % (len(after) - len(after.lstrip("#"))), re.MULTILINE).search(body, start)
        cut = nxt.start() if nxt else len(body)
        body = f"{body[:cut].rstrip()}\n\n{marker}\n\n{body[cut:]}"
    if marker + "\n" in body:
        start = body.index(marker + "\n") + len(marker) + 1
        nxt = heading.search(body, start)
        rest = body[nxt.start():] if nxt else ""
        body = f"{body[:start]}\n{text.strip()}\n\n{rest}"
    else:
        body = f"{body.rstrip()}\n\n{marker}\n\n{text.strip()}\n"
    doc.write_text(body.rstrip() + "\n")


# the plans docs/memory.md shows: (title, preset, overrides, trainer GPUs)
PRESET_PLANS = [
    ("3B, APO preset, 8 GPUs", "apo_view_r1_3b", [], 8),
    ("3B, 4 x 4096 tokens one per micro-batch (the learner benchmark's step), no reference model, 1 GPU",
     "apo_view_r1_3b", LEARNER_STEP, 1),
    ("7B, StepGRPO preset, 8 GPUs", "stepgrpo_r1vl", [], 8),
    ("72B, APO preset's step, TP=8 PP=4, 32 GPUs, engines TP=8", "apo_view_r1_3b",
     ["model.path=Qwen2.5-VL-72B-Instruct", "parallel.tp=8", "parallel.pp=4", "rollout.tensor_parallel_size=8"], 32),
    ("3B, APO preset, 8 GPUs, full recompute", "apo_view_r1_3b", ["model.recompute=full"], 8),
    ("3B, 4 x 4096 tokens one per micro-batch, with the reference model, 2 GPUs (DP=2)", "apo_view_r1_3b",
     LEARNER_STEP + ["algo.kl_coef=0.001"], 2),
    ("7B, StepGRPO preset, 8 GPUs, TP=2, selective recompute", "stepgrpo_r1vl",
     ["parallel.tp=2", "model.recompute=selective"], 8),
    ("72B, TP=8 PP=4, full recompute, reference offloaded, 64 GPUs (DP=2)", "apo_view_r1_3b",
     ["model.path=Qwen2.5-VL-72B-Instruct", "parallel.tp=8", "parallel.pp=4", "rollout.tensor_parallel_size=8",
      "model.recompute=full", "model.ref_offload=true"], 64),
]


def preset_plans(only: tuple = (), write: bool = False) -> None:
    """Plan each of PRESET_PLANS (those whose title contains one of `only`), print it, and with `write` put it in
    docs/memory.md under its own heading."""
    import time

    from megaapo.config import load_config
    from megaapo.memory import plan_memory, render

    for title, preset, overrides, gpus in PRESET_PLANS:
        if only and not any(o in title for o in only):
            continue
        cfg = load_config(preset, overrides)
        t0 = time.perf_counter()
        plan = plan_memory(cfg, world_size=gpus, gpu="h100-80gb")
        wall = time.perf_counter() - t0
        command = " ".join(["megaapo plan", preset, *overrides, f"--gpus {gpus}"])
        text = "\n".join([f"{datetime.date.today().isoformat()}, 2-core CPU machine (shared; load average "
                          f"{os.getloadavg()[0]:.0f}): {wall:.0f} s for the whole command.", "", "```",
                          f"$ {command}", render(plan).rstrip(), "```"])
        print(text, flush=True)
        if write:
            previous = [f"### {t}" for t, *_ in PRESET_PLANS[:PRESET_PLANS.index((title, preset, overrides, gpus))]]
            write_docs(text, f"### {title}", after=previous[-1] if previous else "## Plans of the presets")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU: a small model against the CPU allocator")
    p.add_argument("--presets", nargs="*", default=None,
                   help="print the plans of the presets (those whose title contains one of these words)")
    p.add_argument("--cases", nargs="*", default=(),
                   help="only the cases whose name contains one of these (e.g. 'gpu check': the GPU check's)")
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    if args.presets is not None:
        preset_plans(tuple(args.presets), write=args.write_docs)
        return
    smoke = args.smoke or not torch.cuda.is_available()
    text = table(run(smoke, tuple(args.cases)), smoke)
    print(text)
    if args.write_docs:
        write_docs(text, "#### CPU cross-check, table" if smoke else "### GPU check")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
