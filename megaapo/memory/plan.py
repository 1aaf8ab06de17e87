"""The memory plan of a run: per-GPU peak of every distinct learner rank, the rollout engine's share, and the verdict.

Called by `megaapo plan` (cli), by `megaapo train` at start-up (`startup_check`) and by `benchmarks/memory_plan.py`.
The learner's numbers are traced (`megaapo.memory.trace`: megaapo's own step on fake tensors, one worker process
per traced pipeline stage, in parallel); the engine's are arithmetic on the model's shapes (vLLM's own budget
rule: weights + KV cache within `gpu_memory_utilization` x the GPU). What the trace cannot see is added as stated
margins: the CUDA context with cuBLAS/NCCL workspaces (`CONTEXT`), the caching allocator's fragmentation
(`FRAGMENTATION`), and vLLM's memory outside weights and KV cache (`ENGINE_OVERHEAD`, `ENGINE_ASLEEP`).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

GiB = 1 << 30
MiB = 1 << 20
CONTEXT = 1 * GiB              # CUDA context, cuBLAS workspaces, NCCL buffers: outside PyTorch's allocator
FRAGMENTATION = 0.05           # reserved / allocated - 1 of the caching allocator over a training step
ENGINE_OVERHEAD = 1536 * MiB   # vLLM: profiling activations, sampler, encoder cache (+1 GiB CUDA graphs unless eager)
ENGINE_GRAPHS = 1 * GiB
ENGINE_ASLEEP = 1 * GiB        # colocated: what a sleeping vLLM keeps (graph pool, buffers outside its memory pool)

# total_memory as torch.cuda reports it (nvidia-smi's MiB)
GPUS = {"h100-80gb": 81559 * MiB, "h200-141gb": 143771 * MiB, "a100-80gb": 81920 * MiB, "a100-40gb": 40960 * MiB,
        "l40s-48gb": 46068 * MiB}


class MemoryPlanError(ValueError):
    """A layout that does not fit its GPUs; the message carries the numbers and what to change."""


def gpu_bytes(name: str) -> int:
    """A GPU name from `GPUS` or a size such as '80gib' / '79.6GiB' / '81559mib' -> bytes."""
    key = name.strip().lower()
    if key in GPUS:
        return GPUS[key]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gib|mib)", key)
    if not m:
        raise ValueError(f"trainer.gpu={name!r} is not a known GPU ({', '.join(GPUS)}) or a size like 80gib")
    return int(float(m.group(1)) * (GiB if m.group(2) == "gib" else MiB))


# ------------------------------------------------------------------------------------------------- the model
def model_config(cfg):
    """The HF config to plan for: model.path's config.json; a published Qwen2.5-VL by name when that directory is
    absent here; the tiny model's when model.path is empty. -> (config, a description of where it came from)."""
    from megaapo.models.qwen2_5_vl.config import load_hf_config
    from megaapo.models.qwen2_5_vl.published import published_config, published_size

    path = cfg.model.path
    if path and (Path(path) / "config.json").is_file():
        return load_hf_config(path), path
    if path:
        size = published_size(path)
        if size is None:
            raise FileNotFoundError(f"model.path={path!r} has no config.json: the plan needs the model's config "
                                    "(or a published name such as Qwen2.5-VL-7B-Instruct, whose shapes it knows)")
        return published_config(size), f"published Qwen2.5-VL-{size.upper()} shapes ({path} is not here)"
    return _tiny_config(cfg.model.tiny), "the tiny model (model.path is empty)"


def _tiny_config(tiny):
    import tempfile

    from megaapo.models.qwen2_5_vl.config import load_hf_config
    from megaapo.models.tiny import build_tiny

    with tempfile.TemporaryDirectory() as d:
        path = build_tiny(Path(d) / "m", vocab=tiny.vocab, tie_embeddings=tiny.tie_embeddings,
                          hidden_size=tiny.hidden_size, num_layers=tiny.num_layers, num_heads=tiny.num_heads,
                          num_kv_heads=tiny.num_kv_heads, intermediate_size=tiny.intermediate_size,
                          vision_depth=tiny.vision_depth, vision_hidden_size=tiny.vision_hidden_size,
                          weights=False)
        return load_hf_config(path)


def model_params(hf_cfg) -> int:
    """Parameters of the whole Qwen2.5-VL (vision tower included; a tied embedding counted once)."""
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from megaapo.models.qwen2_5_vl.config import lm_shape

    with torch.device("meta"):
        vision = Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_cfg.vision_config)
    return lm_shape(hf_cfg).num_params() + sum(p.numel() for p in vision.parameters())


# -------------------------------------------------------------------------------------------------- the engine
@dataclass
class EnginePlan:
    gpus_per_engine: int
    weights: int                 # per GPU
    budget: int                  # gpu_memory_utilization x GPU
    overhead: int                # vLLM's memory besides weights and KV cache (estimate)
    kv_cache: int                # what is left for the KV cache
    kv_per_token: int            # per GPU
    max_model_len: int
    tokens_needed: int           # one full-length sequence: vLLM refuses to start below that

    @property
    def kv_tokens(self) -> int:
        return max(0, self.kv_cache) // self.kv_per_token

    @property
    def fits(self) -> bool:
        return self.kv_tokens >= self.tokens_needed


def engine_plan(hf_cfg, cfg, total: int) -> EnginePlan:
    import torch

    from megaapo.models.qwen2_5_vl.config import lm_shape

    r = cfg.rollout
    sh = lm_shape(hf_cfg)
    itemsize = torch.empty(0, dtype=getattr(torch, cfg.model.dtype)).element_size()
    tp = r.tensor_parallel_size
    weights = math.ceil(model_params(hf_cfg) * itemsize / tp)
    kv_heads = max(1, sh.num_kv_heads // tp)   # vLLM replicates KV heads when tp exceeds them
    kv_per_token = 2 * sh.num_layers * kv_heads * sh.head_dim * itemsize
    budget = int(r.gpu_memory_utilization * total)
    overhead = ENGINE_OVERHEAD + (0 if r.enforce_eager else ENGINE_GRAPHS)
    max_len = r.max_model_len or int(getattr(hf_cfg.text_config, "max_position_embeddings", 32768))
    return EnginePlan(gpus_per_engine=tp, weights=weights, budget=budget, overhead=overhead,
                      kv_cache=budget - weights - overhead, kv_per_token=kv_per_token, max_model_len=max_len,
                      tokens_needed=max_len)


# ------------------------------------------------------------------------------------------------- the learner
def stages_to_trace(pp: int) -> list[int]:
    """One rank per distinct stage shape: the first (embedding, vision tower), the first middle one (the most
    micro-batches in flight of the middle stages under 1F1B) and the last (final norm, lm_head, log-probs)."""
    return sorted({0, min(1, pp - 1), pp - 1})


def _trace_worker(args):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""   # the trace runs on fake CPU tensors, never on a device
    import torch

    from megaapo.memory.trace import trace_rank

    torch.set_num_threads(1)
    return trace_rank(*args)


def trace_stages(cfg, hf_cfg, tp: int, pp: int, dp: int, shape, target: str, stages: list[int]) -> list:
    """trace_rank for each stage, each in a fresh spawned process (in parallel, up to the CPU count)."""
    return trace_jobs([(cfg, hf_cfg, tp, pp, dp, s, shape, target) for s in stages])


def trace_jobs(jobs: list[tuple]) -> list:
    """trace_rank(*job) for each job, in spawned processes: a trace joins a fake world of its own and must not meet
    the caller's torch.distributed state (nor see a GPU)."""
    ctx = multiprocessing.get_context("spawn")
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""   # inherited by the workers before they import torch
    try:
        workers = max(1, min(len(jobs), os.cpu_count() or 1))
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, max_tasks_per_child=1) as ex:
            return list(ex.map(_trace_worker, jobs))
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


# ---------------------------------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    model: str
    gpu: str
    gpu_total: int
    tp: int
    pp: int
    dp: int
    mode: str
    shape: dict
    ranks: list                     # RankTrace per traced stage
    engine: EnginePlan
    target: str = "cuda"
    seconds: float = 0.0
    problems: list = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def learner_need(self, trace) -> int:
        """What a trainer GPU must hold at the learner's peak: traced allocations plus the margins."""
        return math.ceil(trace.peak * (1 + FRAGMENTATION)) + CONTEXT

    def to_dict(self) -> dict:
        return asdict(self) | {"fits": self.fits}


def plan_memory(cfg, world_size: int | None = None, gpu: str | None = None, target: str = "cuda",
                hf_config=None) -> MemoryPlan:
    """Trace the configured learner's step for every distinct rank and check it, and the engine, against the GPU.
    world_size: trainer processes (default tp x pp, one data-parallel replica); gpu: a name or size (default:
    trainer.gpu, where 'auto' means the current device, else h100-80gb); hf_config: the model's config when the
    caller has it (default: `model_config(cfg)`)."""
    from megaapo.memory.trace import step_shape

    t0 = time.perf_counter()
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    world = world_size or tp * pp
    if world % (tp * pp):
        raise ValueError(f"{world} trainer GPUs are not divisible by parallel.tp x parallel.pp = {tp} x {pp}")
    dp = world // (tp * pp)
    name = gpu or cfg.trainer.gpu
    total = _device_total() if name == "auto" else gpu_bytes(name)
    if name == "auto":
        name = "this GPU" if total else "h100-80gb"
        total = total or GPUS["h100-80gb"]
    hf_cfg, source = (hf_config, cfg.model.path or "the run's model") if hf_config is not None \
        else model_config(cfg)
    from megaapo.models.qwen2_5_vl.config import check_layout, lm_shape

    check_layout(lm_shape(hf_cfg), tp, pp)
    shape = step_shape(cfg, dp, pp)
    ranks = trace_stages(cfg, hf_cfg, tp, pp, dp, shape, target, stages_to_trace(pp))
    plan = MemoryPlan(model=source, gpu=name, gpu_total=total, tp=tp, pp=pp, dp=dp, mode=cfg.rollout.mode,
                      shape=asdict(shape), ranks=ranks, engine=engine_plan(hf_cfg, cfg, total), target=target)
    plan.problems = _problems(plan, cfg)
    plan.seconds = time.perf_counter() - t0
    return plan


def _device_total() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0


def _problems(plan: MemoryPlan, cfg) -> list[str]:
    """Each way the layout does not fit, as one sentence with its numbers."""
    out, total, e = [], plan.gpu_total, plan.engine
    colocated = plan.mode == "colocated"
    for r in plan.ranks:
        need = plan.learner_need(r) + (ENGINE_ASLEEP if colocated else 0)
        if need > total:
            out.append(f"pipeline stage {r.stage}: the learner needs {need / GiB:.1f} GiB per GPU at its peak "
                       f"({r.peak_phase}: {_split(r.peak_split)}; + {CONTEXT / GiB:.0f} GiB CUDA context, "
                       f"{FRAGMENTATION:.0%} fragmentation{', asleep engine' if colocated else ''}) but "
                       f"{plan.gpu} has {total / GiB:.1f} GiB")
        if colocated:
            resident = math.ceil(sum(r.resident.values()) * (1 + FRAGMENTATION)) + CONTEXT
            if resident + e.budget > total:
                out.append(f"pipeline stage {r.stage}: colocated, the learner keeps {resident / GiB:.1f} GiB "
                           f"while the engine generates, and vLLM takes rollout.gpu_memory_utilization="
                           f"{cfg.rollout.gpu_memory_utilization} x {total / GiB:.1f} = {e.budget / GiB:.1f} GiB: "
                           f"{(resident + e.budget) / GiB:.1f} GiB > {total / GiB:.1f} GiB")
    if not e.fits:
        out.append(f"rollout engine: {e.kv_cache / GiB:.1f} GiB of KV cache ({e.budget / GiB:.1f} GiB budget - "
                   f"{e.weights / GiB:.1f} weights - {e.overhead / GiB:.1f} overhead) holds {e.kv_tokens} tokens, "
                   f"fewer than one max_model_len={e.max_model_len} sequence")
    return out


def _split(split: dict) -> str:
    return ", ".join(f"{k} {v / GiB:.1f}" for k, v in sorted(split.items(), key=lambda kv: -kv[1]) if v >= GiB / 20)
