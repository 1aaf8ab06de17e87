"""The memory plan as people read it (`megaapo plan`, docs/memory.md) and as `megaapo train` enforces it.

`render` prints the plan: one column per traced learner rank (its peak split by what holds the memory), the
margins, the rollout engine's budget, and the verdict. `startup_check` is the check `megaapo.run.Run` makes before
it builds a learner or starts an engine: on GPU runs always (unless `trainer.memory_check=false`), on CPU runs only
when `trainer.gpu` names a GPU to plan for (the CPU demo itself skips it: nothing it runs is on a GPU).
"""

from __future__ import annotations

import logging
from io import StringIO

from megaapo.memory.plan import CONTEXT, ENGINE_ASLEEP, FRAGMENTATION, GiB, MemoryPlan, MemoryPlanError, plan_memory

log = logging.getLogger("megaapo.memory")

ROWS = [("weights", "weights"), ("reference weights", "reference weights"),
        ("grads", "gradients (fp32 grad buffer or .grad)"), ("optimizer", "optimizer (fp32 main + Adam, shard)"),
        ("activations", "activations"), ("log-prob pass", "log-prob pass (workspace, dX)"),
        ("optimizer step", "optimizer step temporaries"), ("other", "other")]


def render(plan: MemoryPlan, title: str = "") -> str:
    from rich.console import Console
    from rich.table import Table

    small = max(r.peak for r in plan.ranks) < GiB   # the tiny CPU models read better in MiB
    unit, div = ("MiB", 1 << 20) if small else ("GiB", GiB)

    def _gib(n: float) -> str:
        return f"{n / div:.1f}" if small else f"{n / div:.2f}"

    s = plan.shape
    images = f", {s['images']} image(s) of {s['image_tokens']} tokens" if s["images"] else ""
    head = (f"{title + ': ' if title else ''}{plan.model}; tp={plan.tp} pp={plan.pp} dp={plan.dp} "
            f"({plan.tp * plan.pp * plan.dp} trainer GPUs), rollout {plan.mode}; GPU {plan.gpu} "
            f"({plan.gpu_total / GiB:.1f} GiB)\nstep: micro-batches of {s['samples_per_microbatch']} x "
            f"{s['prompt_tokens'] + s['response_tokens']} tokens ({s['prompt_tokens']} prompt{images}, "
            f"{s['response_tokens']} response), {'packed' if s['packing'] else 'padded'}, "
            f"{s['microbatches_per_update']} per update per replica ({s['microbatches']} traced)")
    table = Table(title=f"learner, {unit} per GPU at its peak", title_justify="left")
    table.add_column("")
    for r in plan.ranks:
        table.add_column(f"stage {r.stage}", justify="right")
    keys = {k for r in plan.ranks for k in r.peak_split}
    for key, label in ROWS:
        if key in keys:
            table.add_row(label, *[_gib(r.peak_split.get(key, 0)) for r in plan.ranks])
    table.add_row("= peak allocated (traced)", *[_gib(r.peak) for r in plan.ranks])
    colocated = plan.mode == "colocated"
    margin = f"+ CUDA context {CONTEXT / GiB:.0f}, fragmentation {FRAGMENTATION:.0%}" + \
        (f", asleep engine {ENGINE_ASLEEP / GiB:.0f}" if colocated else "")
    table.add_row(margin, *[_gib(plan.learner_need(r) - r.peak + (ENGINE_ASLEEP if colocated else 0))
                            for r in plan.ranks])
    table.add_row("= needed", *[_gib(plan.learner_need(r) + (ENGINE_ASLEEP if colocated else 0))
                                for r in plan.ranks])
    table.add_row("peak in phase", *[r.peak_phase for r in plan.ranks])
    table.add_row("between steps (resident)", *[_gib(sum(r.resident.values())) for r in plan.ranks])
    table.add_row("traced in (s)", *[f"{r.seconds:.1f}" for r in plan.ranks])
    e = plan.engine
    where = "on each trainer GPU" if colocated else f"on {e.gpus_per_engine} GPU(s) of its own"
    engine = (f"rollout engine ({where}), GiB: budget {e.budget / GiB:.2f} = weights {e.weights / GiB:.2f} + "
              f"overhead {e.overhead / GiB:.2f} + KV cache {e.kv_cache / GiB:.2f} ({e.kv_tokens:,} tokens; "
              f"max_model_len {e.max_model_len:,})")
    verdict = "fits" if plan.fits else "DOES NOT FIT:\n  - " + "\n  - ".join(plan.problems)
    out = StringIO()
    Console(file=out, width=120, highlight=False, color_system=None).print(table)
    return f"{head}\n{out.getvalue()}{engine}\nverdict: {verdict}\n"


def startup_check(cfg, model_path, world_size: int, gpu_run: bool) -> MemoryPlan | None:
    """Plan this run's memory and raise MemoryPlanError (with the numbers) when it cannot fit; None when skipped.
    Called on global rank 0 before any learner or engine exists."""
    if not cfg.trainer.memory_check:
        log.info("memory plan: skipped (trainer.memory_check=false)")
        return None
    if not gpu_run and cfg.trainer.gpu == "auto":
        log.info("memory plan: skipped on a CPU run (trainer.gpu=h100-80gb, or any GPU, plans one)")
        return None
    from megaapo.models.qwen2_5_vl.config import load_hf_config

    plan = plan_memory(cfg, world_size=world_size, hf_config=load_hf_config(model_path))
    if not plan.fits:
        raise MemoryPlanError(
            f"this layout does not fit {plan.gpu} ({plan.gpu_total / GiB:.1f} GiB): " + "; ".join(plan.problems) +
            ". Try more data-parallel GPUs, parallel.tp/pp, model.recompute=full, a smaller "
            "parallel.micro_batch_tokens or rollout.gpu_memory_utilization (`megaapo plan` prints the whole plan; "
            "trainer.memory_check=false skips this check)")
    peak = max(plan.learner_need(r) for r in plan.ranks)
    log.info("memory plan: fits %s (learner needs %.1f of %.1f GiB per GPU; traced in %.0fs)", plan.gpu,
             peak / GiB, plan.gpu_total / GiB, plan.seconds)
    return plan
