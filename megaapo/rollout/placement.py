"""Which GPU each process of a run gets: trainer ranks and the rollout engines this trainer starts, disjoint.

Called by `megaapo.run.Run` first thing, before any process group, learner or engine exists (a layout that cannot
work is refused there, on every rank of the node that would start the engines, with one `ConfigError`), by the
dry run, and by `RolloutClient` when it is used on its own (it then plans with the same rules from the environment).

Rules (`docs/rollout.md`, "Placement"):
* Trainer local rank r uses the node's r-th visible GPU (`init_distributed` calls `torch.cuda.set_device(r)`), so
  a node must show at least as many GPUs as it runs trainer processes: two ranks of one NCCL group on one GPU fail
  ("Duplicate GPU detected").
* Engines started by the trainer (disaggregated, no `rollout.addresses`) run on global rank 0's node, each on
  `rollout.tensor_parallel_size` GPUs of their own, handed to the engine process as `CUDA_VISIBLE_DEVICES`:
  `rollout.engine_gpus` when given, else the node's GPUs after the trainers'. They join the weight-sync NCCL group
  with trainer rank 0, so they may not share a trainer's GPU. Only a caller that never forms that group (eval)
  may fall back to sharing, with a warning.
* Engines listed in `rollout.addresses` (e.g. on SLURM rollout nodes) are placed by whoever started them.
* Colocated mode runs one engine inside the single trainer process, on its GPU (sleeping while the learner works).
* Without GPUs (CPU runs) nothing is placed.
GPU ids are the node's own names for them: the entries of the trainer's `CUDA_VISIBLE_DEVICES` if set (indices or
UUIDs, passed on as written), else 0..n-1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from megaapo.config import ConfigError

log = logging.getLogger("megaapo.rollout")


@dataclass(frozen=True)
class Placement:
    """The plan for one node. `engines` is None where this node starts no engine processes (remote engines,
    colocated mode, another node of a multi-node run); an engine's entry is empty where it runs on CPU."""
    trainer_gpus: tuple[str, ...]                   # by local rank; empty when the trainer runs on CPU
    engines: Optional[tuple[tuple[str, ...], ...]]  # per engine this node starts: its GPUs
    shared: bool = False                            # an engine shares a trainer's GPU (callers without weight sync)

    def engine_env(self, i: int) -> dict:
        """Environment entries for engine i's process (none on CPU)."""
        if not self.engines or not self.engines[i]:
            return {}
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.engines[i])}

    def describe(self) -> str:
        parts = [f"trainer local ranks 0-{len(self.trainer_gpus) - 1} on GPUs {','.join(self.trainer_gpus)}"
                 if self.trainer_gpus else "trainer on CPU"]
        if self.engines is not None:
            parts += [f"engine {i} on " + (f"GPUs {','.join(g)}" if g else "CPU") for i, g in enumerate(self.engines)]
        return "; ".join(parts)


def visible_gpus(env: Mapping[str, str] = os.environ, device_count: Optional[int] = None) -> list[str]:
    """This node's GPUs as the trainer sees them: its CUDA_VISIBLE_DEVICES entries, else 0..device_count-1."""
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    if device_count == 0:
        return []
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()][:device_count]
    return [str(i) for i in range(device_count)]


def plan(*, gpus: Sequence[str], local_trainers: int, world_size: int, rollout, starts_engines: bool = True,
         weight_sync: bool = True) -> Placement:
    """Place this node's trainer ranks and the engines it starts (pure; raises ConfigError naming the fix).

    gpus: the node's GPUs (`visible_gpus`), empty on CPU; local_trainers: trainer processes on this node that use
    a GPU (0 for a CPU trainer); world_size: all trainer processes; rollout: the `RolloutConfig`; starts_engines:
    this is global rank 0's node; weight_sync: the engines will join an NCCL group with trainer rank 0."""
    gpus = list(gpus)
    if local_trainers > len(gpus) and gpus:
        raise ConfigError(f"{local_trainers} trainer processes on this node but only {len(gpus)} GPU(s) visible "
                          f"({','.join(gpus)}): two ranks of the trainer's NCCL group would share a GPU; start at most "
                          f"{len(gpus)} per node (NPROC_PER_NODE / --nproc_per_node)")
    trainer_gpus = tuple(gpus[:local_trainers])
    if rollout.mode == "colocated":
        if world_size > 1:
            raise ConfigError(f"rollout.mode=colocated with {world_size} trainer processes: the engine lives inside "
                              "one trainer process, and vLLM built in one rank of a larger torch.distributed world "
                              "waits for the others (a hang); megaapo does not run vLLM's external launcher (an engine "
                              "per rank). Run colocated with one trainer process, or rollout.mode=disaggregated")
        return Placement(trainer_gpus, None)
    if rollout.addresses or not starts_engines:
        return Placement(trainer_gpus, None)
    return Placement(trainer_gpus, *_place_engines(gpus, trainer_gpus, rollout, weight_sync))


def _place_engines(gpus: list[str], trainer_gpus: tuple[str, ...], rollout, weight_sync: bool):
    per, n = rollout.tensor_parallel_size, rollout.num_engines
    want = [str(g) for g in rollout.engine_gpus]
    if not gpus:
        if want:
            raise ConfigError(f"rollout.engine_gpus={want} but this node has no GPU visible to the trainer; "
                              "leave rollout.engine_gpus empty on CPU")
        return tuple(() for _ in range(n)), False
    need = n * per
    if want:
        if len(want) != need:
            raise ConfigError(f"rollout.engine_gpus lists {len(want)} GPU(s), but rollout.num_engines={n} x "
                              f"rollout.tensor_parallel_size={per} engines need exactly {need}")
        unknown = [g for g in want if g not in gpus]
        dup = sorted({g for g in want if want.count(g) > 1})
        taken = [g for g in want if g in trainer_gpus]
        if unknown:
            raise ConfigError(f"rollout.engine_gpus: {','.join(unknown)} not among this node's GPUs "
                              f"({','.join(gpus)})")
        if dup:
            raise ConfigError(f"rollout.engine_gpus lists GPU {','.join(dup)} more than once: two engine workers "
                              "of the weight-sync NCCL group would share a GPU")
        if taken:
            raise ConfigError(f"rollout.engine_gpus: GPU {','.join(taken)} is a trainer rank's (trainer local ranks "
                              f"use GPUs {','.join(trainer_gpus)}): engines and trainer ranks need disjoint GPUs")
        chosen = want
    else:
        chosen = [g for g in gpus if g not in trainer_gpus][:need]
    shared = False
    if len(chosen) < need:
        if weight_sync and len(gpus) >= need:
            raise ConfigError(
                f"{n} rollout engine(s) x {per} GPU(s) need {need} GPU(s) of their own, but this node has "
                f"{len(gpus)} and the {len(trainer_gpus)} trainer process(es) use {len(trainer_gpus)}: an engine on a "
                "trainer's GPU would share a GPU within the weight-sync NCCL group. Start fewer trainer processes "
                "(NPROC_PER_NODE), run the engines elsewhere (rollout.addresses; SLURM: ROLLOUT_NODES), or on one GPU "
                "use rollout.mode=colocated")
        if len(gpus) < need:
            raise ConfigError(f"{n} rollout engine(s) x {per} GPU(s) need {need} GPU(s), but this node has "
                              f"{len(gpus)} ({','.join(gpus)}); lower rollout.num_engines or "
                              "rollout.tensor_parallel_size, or run the engines elsewhere (rollout.addresses)")
        # No weight sync (eval): the free GPUs first, then the trainer's, which this process barely uses.
        chosen = (chosen + [g for g in gpus if g not in chosen])[:need]
        shared = True
        log.warning("rollout engines share GPU(s) with the trainer process (%d GPU(s) visible for %d engine GPU(s) "
                    "and %d trainer process(es)): %s", len(gpus), need, len(trainer_gpus), ",".join(chosen))
    return tuple(tuple(chosen[i * per:(i + 1) * per]) for i in range(n)), shared


def plan_here(rollout, *, trainer_on_gpu: bool, weight_sync: bool = True,
              env: Mapping[str, str] = os.environ, device_count: Optional[int] = None) -> Placement:
    """`plan` for this process, from the launcher's environment: torchrun's WORLD_SIZE, LOCAL_WORLD_SIZE and
    GROUP_RANK (the node's index; engines start on node 0, where global rank 0 runs), or one process."""
    world = int(env.get("WORLD_SIZE", 1))
    local = int(env.get("LOCAL_WORLD_SIZE", world))
    node = int(env.get("GROUP_RANK", int(env.get("RANK", 0)) // max(1, local)))
    return plan(gpus=visible_gpus(env, device_count), local_trainers=local if trainer_on_gpu else 0,
                world_size=world, rollout=rollout, starts_engines=node == 0, weight_sync=weight_sync)
