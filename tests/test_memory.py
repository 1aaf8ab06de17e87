"""The memory plan (`megaapo plan`, megaapo.memory): its static figures against hand-computed ones, its step peak
against a real CPU run, its margins and verdicts, and `megaapo train` refusing a layout that cannot fit."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))   # after the repository: benchmarks/kernels.py must not shadow kernels/

# A small Qwen2.5-VL (megaapo.models.tiny.tiny_config) whose parameters are listed by hand below.
H, LAYERS, NH, NKV, FFN, VOCAB, HV, VISION_DEPTH = 128, 4, 4, 2, 320, 1024, 64, 1
MODEL = dict(hidden_size=H, num_layers=LAYERS, num_heads=NH, num_kv_heads=NKV, intermediate_size=FFN,
             vision_depth=VISION_DEPTH, vision_hidden_size=HV)
STEP = ["data.max_prompt_tokens=16", "rollout.max_new_tokens=16", "parallel.micro_batch_tokens=32",
        "rollout.prompts_per_step=2", "rollout.n_samples=2", "rollout.max_images_per_prompt=0", "algo.kl_coef=0",
        "algo.updates_per_batch=1", "model.dtype=bfloat16"]


def hand_vision() -> list[int]:
    """The vision tower's parameter sizes (transformers' Qwen2.5-VL vision blocks and patch merger, with biases)."""
    fv = 2 * HV   # tiny_config's vision MLP width
    block = [HV, HV, HV * 3 * HV, 3 * HV, HV * HV, HV, HV * fv, fv, HV * fv, fv, fv * HV, HV]   # norms, qkv, proj, MLP
    merger = [HV, 4 * HV * 4 * HV, 4 * HV, 4 * HV * H, H]
    return [3 * 2 * 14 * 14 * HV] + block * VISION_DEPTH + merger   # patch embedding (no bias) first


def hand_params(tp: int, pp: int, stage: int) -> tuple[list[int], list[int]]:
    """(bf16 parameter sizes, fp32 parameter sizes) of one rank's shard, from the config's numbers alone.
    megatron's local layer spec builds its RMSNorm weights (torch.nn.RMSNorm) in fp32; everything else is bf16."""
    d = H // NH
    layer = [(NH + 2 * NKV) * d * H // tp, (NH + 2 * NKV) * d // tp,   # linear_qkv weight, bias
             H * NH * d // tp, 2 * FFN * H // tp, H * FFN // tp]       # linear_proj, fc1 (gate + up), fc2
    bf16 = layer * (LAYERS // pp)
    fp32 = [H, H] * (LAYERS // pp)                                     # input / pre-mlp layernorms
    if stage == 0:
        bf16 += [VOCAB * H // tp] + hand_vision()   # word embedding; the vision tower, replicated over TP
    if stage == pp - 1:
        bf16 += [VOCAB * H // tp]   # output layer (untied)
        fp32 += [H]                 # final layernorm
    return bf16, fp32


def _r(n: int, block: int) -> int:
    return -(-n // block) * block


def expected_torch(bf16, fp32, unused: int = 0) -> dict:
    """torch AdamW: bf16/fp32 weights, gradients of the same dtypes (none for `unused` bf16 elements: the vision
    tower of a step without images), fp32 master copies of every parameter (the model is not all-fp32) and two fp32
    moments each: 12 bytes per parameter."""
    n16, n32 = sum(bf16), sum(fp32)
    return {"weights": 2 * n16 + 4 * n32, "grads": 2 * (n16 - unused) + 4 * n32, "optimizer": 12 * (n16 + n32)}


def expected_megatron(bf16, fp32, dp: int) -> dict:
    """megatron DDP + DistributedOptimizer, as a caching allocator counts it (512-byte blocks): one param and one
    fp32 grad buffer per dtype, each parameter starting at a 64-element boundary and each buffer padded to
    lcm(dp, 128) elements; an fp32 main copy per bf16 parameter (fp32 ones are their own) and two fp32 moments, all
    of it at dp=1 (the caller halves it for a shard)."""
    def padded(sizes):
        return _r(sum(_r(n, 64) for n in sizes), math.lcm(dp, 128))

    p16, p32 = padded(bf16), padded(fp32)
    return {"weights": _r(2 * p16, 512) + _r(4 * p32, 512), "grads": _r(4 * p16, 512) + _r(4 * p32, 512),
            "optimizer": sum(3 * _r(4 * n, 512) for n in bf16) + sum(2 * _r(4 * n, 512) for n in fp32)}


@pytest.fixture(scope="module")
def static_traces():
    """One trace per (optimizer, layout, stage), traced together in spawned processes."""
    from megaapo.config import load_config
    from megaapo.memory.plan import trace_jobs
    from megaapo.memory.trace import step_shape
    from megaapo.models.tiny import tiny_config

    hf = tiny_config(VOCAB, **MODEL)
    cases = [("torch", 2, 1, 1, 0, "cpu"), ("torch", 1, 2, 1, 1, "cpu"), ("megatron", 1, 2, 2, 0, "cuda"),
             ("megatron", 1, 2, 2, 1, "cuda")]
    jobs = []
    for impl, tp, pp, dp, stage, target in cases:
        cfg = load_config("demo", STEP + [f"optim.impl={impl}", f"parallel.tp={tp}", f"parallel.pp={pp}"])
        jobs.append((cfg, hf, tp, pp, dp, stage, step_shape(cfg, dp, pp), target))
    return dict(zip(cases, trace_jobs(jobs)))


@pytest.mark.slow
def test_static_memory_matches_hand_computed_figures(static_traces):
    for (impl, tp, pp, dp, stage, target), t in static_traces.items():
        bf16, fp32 = hand_params(tp, pp, stage)
        got = {k: t.resident.get(k, 0) for k in ("weights", "grads", "optimizer")}
        if impl == "torch":   # the step has no images: the vision tower (stage 0) gets no gradient
            want = expected_torch(bf16, fp32, unused=sum(hand_vision()) if stage == 0 else 0)
        elif dp == 1:
            want = expected_megatron(bf16, fp32, dp)
        else:   # sharded: half of the dp=1 state, up to where the shard boundary cuts a parameter
            full = expected_megatron(bf16, fp32, 1)
            want = expected_megatron(bf16, fp32, dp) | {"optimizer": full["optimizer"] // dp}
            assert abs(got["optimizer"] - want["optimizer"]) <= 12 * max(bf16 + fp32) + 3 * 512 * len(bf16 + fp32)
            got["optimizer"] = want["optimizer"]
        assert got == want, (impl, tp, pp, dp, stage)


@pytest.mark.slow
def test_pipeline_stages_hold_the_in_flight_activations(static_traces):
    """1F1B: the first of two stages keeps two micro-batches' activations (same layers as the last stage), the last
    one; the last stage alone does the log-prob pass."""
    first, last = static_traces[("megatron", 1, 2, 2, 0, "cuda")], static_traces[("megatron", 1, 2, 2, 1, "cuda")]
    assert "log-prob pass" not in first.category_peaks and last.category_peaks["log-prob pass"] > 0
    assert first.category_peaks["activations"] > 1.5 * last.category_peaks["activations"]


def test_packed_attention_is_planned_as_the_gpu_varlen_kernel_keeps_it():
    """GPU plan of a packed row's attention: what torch's varlen flash kernel keeps, the output [T, heads, d] and an
    fp32 log-sum-exp per token and head; the CPU path (per-sample SDPA, then a concatenation) keeps about twice that,
    which the plan took for the GPU's before it had its own stand-in."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from megaapo.memory.tracker import StorageTracker
    from megaapo.memory.world import _varlen_on_gpu
    from megaapo.models.qwen2_5_vl.attention import varlen_attention

    T, heads, groups, d = 96, 4, 2, 32

    def kept(fn):
        tracker = StorageTracker(block=1)
        cu = torch.tensor([0, 40, T], dtype=torch.int32)
        with FakeTensorMode(allow_non_fake_inputs=True), tracker:
            q = torch.empty(T, heads, d, dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.empty(T, groups, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
            before = tracker.total
            out = fn(q, k, v, cu, 56, d ** -0.5)
            return tracker.total - before, tuple(out.shape), out.is_contiguous()

    assert kept(_varlen_on_gpu) == (T * heads * d * 2 + heads * T * 4, (T, heads, d), True)
    assert kept(varlen_attention)[0] > 1.5 * kept(_varlen_on_gpu)[0]


@pytest.mark.slow
def test_cpu_cross_check_within_one_percent():
    """The simulator (CPU paths) against the CPU allocator's peak of the same calls in two gloo processes (pipeline
    stages, megatron's optimizer), with transformers' window-by-window vision attention in the measured run."""
    import memory_plan

    rows = memory_plan.run(smoke=True, only=("pp=2",))
    assert len(rows) == 2
    for r in rows:
        assert abs(r["error"]) <= 0.01, r


def test_gpu_names_and_sizes():
    from megaapo.config import ConfigError, load_config
    from megaapo.memory.plan import GiB, gpu_bytes

    assert gpu_bytes("h100-80gb") == 81559 << 20
    assert gpu_bytes("80GiB") == 80 * GiB and gpu_bytes("81559mib") == 81559 << 20
    with pytest.raises(ConfigError, match="trainer.gpu='h100'.*h100-80gb"):
        load_config("demo", ["trainer.gpu=h100"])


def test_verdicts_name_the_numbers():
    """The margins and the colocated rules on a plan with known traced figures."""
    from types import SimpleNamespace

    from megaapo.config import load_config
    from megaapo.memory.plan import CONTEXT, ENGINE_ASLEEP, GiB, EnginePlan, MemoryPlan, _problems
    from megaapo.memory.trace import RankTrace

    def plan(peak, resident, mode, total=80 * GiB):
        rank = RankTrace(stage=0, peak=peak, peak_phase="train step", peak_split={"activations": peak},
                         phases={}, resident={"weights": resident}, category_peaks={}, seconds=0.0)
        engine = EnginePlan(1, 8 * GiB, 48 * GiB, 2 * GiB, 38 * GiB, 1 << 20, 4096, 4096)
        return MemoryPlan(model="m", gpu="g", gpu_total=total, tp=1, pp=1, dp=1, mode=mode, shape={},
                          ranks=[rank], engine=engine)

    cfg = load_config("demo", ["rollout.gpu_memory_utilization=0.6"])
    fits = int((80 * GiB - CONTEXT) / 1.05) - (1 << 20)
    assert _problems(plan(fits, 0, "disaggregated"), cfg) == []
    [msg] = _problems(plan(fits + (8 << 20), 0, "disaggregated"), cfg)
    assert "pipeline stage 0" in msg and "80.0 GiB" in msg
    # colocated: the sleeping engine's residue during the step, the learner's resident memory while generating
    assert _problems(plan(fits - ENGINE_ASLEEP, 0, "colocated"), cfg) == []
    assert len(_problems(plan(fits, 0, "colocated"), cfg)) == 1
    [msg] = _problems(plan(10 * GiB, 40 * GiB, "colocated"), cfg)
    assert "gpu_memory_utilization=0.6" in msg
    small_kv = plan(GiB, 0, "disaggregated")
    small_kv.engine.kv_cache = 1000
    assert "KV cache" in _problems(small_kv, SimpleNamespace(rollout=cfg.rollout))[0]


def test_engine_plan_counts_weights_and_kv_cache():
    from megaapo.config import load_config
    from megaapo.memory.plan import GiB, engine_plan, model_params
    from megaapo.models.qwen2_5_vl.published import published_config

    hf = published_config("7b")
    assert 8.2e9 < model_params(hf) < 8.4e9   # Qwen2.5-VL-7B: 8.29 B parameters with its vision tower
    cfg = load_config("apo_view_r1_3b", ["rollout.tensor_parallel_size=2", "rollout.max_model_len=8192"])
    e = engine_plan(hf, cfg, 80 * GiB)
    assert e.weights == math.ceil(model_params(hf) * 2 / 2)
    assert e.kv_per_token == 2 * 28 * (4 // 2) * 128 * 2   # K and V, 28 layers, 2 of 4 KV heads, 128 dims, bf16
    assert e.kv_cache == int(0.6 * 80 * GiB) - e.weights - e.overhead and e.fits


@pytest.mark.slow
def test_train_refuses_a_layout_that_cannot_fit_before_any_engine(tmp_path, tiny_model):
    """On CPU the check runs when trainer.gpu names a GPU; 0.5 GiB cannot hold the CUDA context alone."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megaapo.cli", "train", "demo", f"trainer.output_dir={out}",
           f"model.path={tiny_model}", "trainer.gpu=0.5gib", "data.synth.n_train=16", "data.synth.n_eval=4",
           "logging.wandb=disabled"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "does not fit 0.5gib (0.5 GiB)" in line and "GiB per GPU at its peak" in line and "Try " in line
    assert "Traceback" not in proc.stderr
    assert not (out / "engines").exists() and "engine(s) ready" not in proc.stderr


@pytest.mark.slow
def test_plan_command_prints_the_plan_and_its_verdict(tmp_path, tiny_model):
    import json

    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "megaapo.cli", "plan", "demo", f"model.path={tiny_model}", "--gpu", "2gib",
           "--gpus", "2", "--json", str(out), "rollout.gpu_memory_utilization=0.5"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]   # the engine's 1 GiB budget holds no KV cache
    assert "dp=2 (2 trainer GPUs)" in proc.stdout and "= peak allocated (traced)" in proc.stdout
    assert "DOES NOT FIT" in proc.stdout and "rollout engine:" in proc.stdout
    plan = json.loads(out.read_text())
    assert plan["fits"] is False and plan["dp"] == 2 and len(plan["problems"]) == 1
    [rank] = plan["ranks"]
    assert rank["peak"] >= sum(rank["resident"].values()) > 0 and rank["peak_phase"]
