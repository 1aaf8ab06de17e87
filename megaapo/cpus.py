"""CPU budgets for CPU runs: which cores the trainer process and the engine processes it starts may use.

On a small CPU machine an asynchronous run (`rollout.max_staleness >= 1`) overlaps the engine's generation with
the learner's step only if the two do not fight over the same cores. vLLM's CPU worker binds its OpenMP threads to
`VLLM_CPU_OMP_THREADS_BIND`, but the rest of its process (and an OpenMP team sized by the machine's core count
before the bind) still runs anywhere: on 2 cores an engine bound to core 1 was measured spinning a second OpenMP
thread at ~55% of core 0, the learner's core. So a budget here confines whole processes, every thread of them:

* `trainer.cpus`: the trainer process pins itself (`Run` does, first thing); the reward workers it starts inherit it;
* `rollout.engine_cpus`: the engine processes the trainer starts get `VLLM_CPU_OMP_THREADS_BIND` and
  `OMP_NUM_THREADS` for those cores, and the engine server confines itself to them before it imports vLLM;
* `trainer.cpu_split`: both of the above from the cores the trainer was started on, half each (the CPU demo's
  layout: whatever cores a machine or container gives, never a fixed core number that may not be there).

Called by `megaapo.run.Run`, `megaapo.rollout.client.RolloutClient` (engine environment) and
`megaapo.rollout.server` (engine side).
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Optional

_CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
# The cores this process was given (by the machine, a cgroup, SLURM or taskset) before any pinning here.
_GIVEN = frozenset(os.sched_getaffinity(0))


def parse(cpus: str) -> Optional[list[int]]:
    """'1', '0,2' or '2-3,6' -> the cores; None for anything else (vLLM's 'auto', 'all', 'nobind' or its
    per-rank 'a-b|c-d' form, which this module leaves to vLLM)."""
    cpus = cpus.replace(" ", "")
    if not _CPU_LIST.match(cpus):
        return None
    out: list[int] = []
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return sorted(set(out))


def check(cpus: Iterable[int], what: str) -> list[int]:
    """The configured cores, refused with the key's name if one is not a core this machine has."""
    from megaapo.config import ConfigError

    try:
        cpus = [int(c) for c in cpus]
    except (TypeError, ValueError):
        raise ConfigError(f"{what}={list(cpus)}: give core numbers, e.g. {what}=[0] or {what}=[2,3]") from None
    missing = [c for c in cpus if c not in _GIVEN]
    if missing:
        raise ConfigError(f"{what}={cpus}: core(s) {missing} are not available to this process "
                          f"(it was started on {sorted(_GIVEN)})")
    return cpus


def given() -> list[int]:
    """The cores this process was started on."""
    return sorted(_GIVEN)


def split(cores: Iterable[int]) -> Optional[tuple[list[int], list[int]]]:
    """`trainer.cpu_split`: (the trainer's cores, the engines' cores): the first half of `cores`, rounded up, and the
    rest (2 cores: one each; 3: two and one). None with fewer than 2 cores: nothing to split."""
    cores = sorted(set(cores))
    if len(cores) < 2:
        return None
    half = (len(cores) + 1) // 2
    return cores[:half], cores[half:]


def pin_process(cpus: Iterable[int]) -> None:
    """Confine every thread of this process, and whatever it starts later, to `cpus` (Linux's affinity is per
    thread: threads that already exist, such as an OpenMP pool or a monitor thread, are moved one by one)."""
    cpus = set(cpus)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):   # a thread that ended meanwhile
            pass
    os.sched_setaffinity(0, cpus)


def engine_env(cpus: Iterable[int]) -> dict:
    """Environment entries for an engine process confined to `cpus` (none when empty): vLLM's OpenMP bind and a
    team of one thread per core from the first parallel region on."""
    cpus = list(cpus)
    if not cpus:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cpus), "OMP_NUM_THREADS": str(len(cpus))}


def confine_engine(env=os.environ) -> Optional[list[int]]:
    """Engine side, before vLLM is imported: a plain core list in VLLM_CPU_OMP_THREADS_BIND confines the whole
    process to those cores and sizes the OpenMP team to match (unless OMP_NUM_THREADS is set). Returns the cores."""
    cpus = parse(env.get("VLLM_CPU_OMP_THREADS_BIND", ""))
    if not cpus:
        return None
    env.setdefault("OMP_NUM_THREADS", str(len(cpus)))
    pin_process(cpus)
    return cpus
