"""A training step's GPU memory, simulated on CPU: `megaapo plan` and the start-up check of `megaapo train`.

    tracker.py  what a CUDA caching allocator would count, from the storages a traced program creates
    trace.py    one learner rank's step (megaapo's own code) on fake tensors in a fake TP x PP x DP world
    plan.py     every distinct rank traced, the rollout engine's share, the margins, the verdict
    report.py   the plan printed; the check `megaapo.run` makes before building anything
docs/memory.md has the plans of the presets and the simulator's measured error.
"""

from megaapo.memory.plan import GPUS, MemoryPlan, MemoryPlanError, plan_memory
from megaapo.memory.report import render, startup_check

__all__ = ["GPUS", "MemoryPlan", "MemoryPlanError", "plan_memory", "render", "startup_check"]
