"""Format 1 checkpoints (megaapo's own per-rank shards, written before dist_checkpointing): read, never written.

A format-1 `step_N` holds each trainer rank's model shard, its optimizer state in megaapo's old layout and its RNG
state, so it loads only at the layout and `optim.impl` that wrote it. Called by `megaapo.run.Run` (a resume) and
`megaapo convert reshard` (which loads it at its own layout and writes format 2). `load` checks everything on every
rank first (layout, optimizer, every tensor's name and shape) and refuses with the command that converts it, or
loads all of it: nothing half-loads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaapo import checkpoint as ckpt


def how_to_convert(path) -> str:
    return (f"convert it once with `megaapo convert reshard {path} NEW_DIR` (it loads it at the layout that wrote it "
            "and writes the new format, which resumes at any layout), then checkpoint.resume=NEW_DIR/"
            f"{ckpt.step_dir_name(ckpt.read_manifest(path)['step'])}")


def load(path, policy, reference=None, verified: bool = False) -> ckpt.Loaded:
    """Load the format-1 checkpoint at `path` into `policy` (weights, optimizer, schedule position, version) and,
    if it holds one, `reference`; returns what `checkpoint.load` read (meta, RNG). Collective. Each rank's files are
    checked against their checksums first unless `verified` (`checkpoint.resolve_resume` verified them all)."""
    world = ckpt.read_manifest(path)["world_size"]
    if world != dist.get_world_size():
        raise ckpt.CheckpointError(f"{path} is in megaapo's format 1, written by {world} trainer processes, and loads "
                                   f"only at that layout (this run has {dist.get_world_size()}); "
                                   + how_to_convert(path))
    loaded = ckpt.load(path, rank=dist.get_rank(), weights_only=False, verified=verified)
    problem = _problem(loaded.shards, policy, reference)
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    bad = next((p for p in problems if p is not None), None)
    if bad is not None:
        raise ckpt.CheckpointError(f"{path} is in megaapo's format 1 and does not fit this run ({bad}); "
                                   + how_to_convert(path))
    shards = loaded.shards
    policy.load_model_tensors(shards["model"])
    _load_optimizer(policy.optim, shards["optim"]["optimizer"])
    policy.lr_step, policy.version = int(shards["optim"]["lr_step"]), int(shards["optim"]["version"])
    if reference is not None and "ref" in shards:
        reference.load_model_tensors(shards["ref"])
    return loaded


def _problem(shards: dict, policy, reference) -> str | None:
    """Why this rank's shards cannot load into these learners, or None."""
    optim = shards.get("optim", {})
    if "lr_step" not in optim:
        return "its optimizer state predates megaapo.optim"
    state, impl = optim["optimizer"], policy.optim.name
    if state.get("impl", "torch") != impl:
        return f"optimizer written by optim.impl={state.get('impl', 'torch')}, this run uses optim.impl={impl}"
    if impl == "megatron" and state["dp_size"] != policy.groups.dp_size:
        return f"optimizer sharded over {state['dp_size']} data-parallel ranks, this run has {policy.groups.dp_size}"
    for name, tensors, learner in (("model", shards["model"], policy),
                                   ("ref", shards.get("ref"), reference if "ref" in shards else None)):
        if learner is None:
            continue
        mine = {k: v for k, v in learner.model.state_dict().items() if not k.endswith("_extra_state")}
        wrong = [k for k, v in mine.items() if k not in tensors or tuple(tensors[k].shape) != tuple(v.shape)]
        if wrong:
            return f"{name} tensor {wrong[0]} is missing or shaped for another tensor/pipeline-parallel layout"
    return None


def _load_optimizer(optim, state: dict) -> None:
    """The optimizer state of megaapo.optim before dist_checkpointing (per rank, tied to its layout)."""
    if optim.name == "torch":
        optim.optimizer.load_state_dict(state["optimizer"])
        if optim.master is not None:
            with torch.no_grad():
                for m, saved in zip(optim.master, state["master"], strict=True):
                    m.copy_(saved)
        return
    for part, saved in zip(optim._parts(), state["parts"], strict=True):
        part.optimizer.load_state_dict(saved["inner"])
        mains = [t for group in part.shard_fp32_from_float16_groups for t in group]
        with torch.no_grad():
            for t, s in zip(mains, saved["main"], strict=True):
                t.copy_(s)
