"""The learner's tensors through megatron-core's `dist_checkpointing`: sharded state dicts, fully parallel (async)
save and load in the `torch_dist` format, so that a checkpoint written at one TP x PP x DP loads at any other.

Who calls it: `megaapo.run.Run` (save and resume, through `Saver` and `load`), `megaapo.convert` (reshard,
mcore-to-hf) and `megaapo eval`. `megaapo.checkpoint` stays the layer that knows the run's own state (step, data
position, weight version, W&B run id, RNG) and owns the atomic commit; this module knows how tensors are laid out
over the ranks and how megatron-core writes and reads them.

What the tensors of a checkpoint are (torch_dist keeps every tensor whole: shards with their global offsets):
  model      GPTModel's own `sharded_state_dict` (TP splits, global layer numbers across PP stages, the tied
             embedding written once) plus the vision tower, which is replicated: its main replica (TP rank 0, DP
             rank 0) writes it.
  optimizer  `optim.impl=megatron`: DistributedOptimizer's `fully_reshardable` format (its DP shards gathered into
             model-shaped fp32 params and Adam moments, keyed by the model tensors); `optim.impl=torch`: AdamW's
             moments mapped onto the model's sharded tensors the same way. Both reshard with the model.
  rng        each rank's RNG streams, one ShardedObject per rank (restored only at the layout that wrote them).
Save: each rank writes the main replicas it holds, spread over the data-parallel replicas
(FullyParallelSaveStrategyWrapper); with async save the write runs in a process forked from the trainer (megatron's
TemporalAsyncCaller: the fork is the snapshot, so training goes on at once) and the commit runs once every rank's
write has finished. Load: each data-parallel replica reads part of the tensors and they exchange the rest
(FullyParallelLoadStrategyWrapper). Loading reads into fresh tensors; the caller applies them only when everything
was read, so nothing half-loads.
Integrity is megaapo.integrity's, as for every checkpoint: NaN/inf state is refused before a save, the commit
checksums every file into the manifest, `read` verifies them before reading, and a failed write or commit is a
`rundir.WriteError` (one line) after the `.tmp-` directory is removed.

On CPU / gloo all of this runs (the CPU shim redirects fully parallel loading's "cuda" buffers); megatron's
persistent async worker (`PersistentAsyncCaller`, CUDA-only: it calls `torch.cuda.set_device`) and the NVRx async
strategy are not used.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megaapo import integrity, rundir
from megaapo.checkpoint import CheckpointError

log = logging.getLogger(__name__)


class LoadError(CheckpointError):
    """A checkpoint whose tensors do not fit what this run asks for; the message names them."""


# ---------------------------------------------------------------------------------------------------- state dicts
def model_sharded_state_dict(model, groups, prefix: str = "") -> dict:
    """The learner model's tensors as ShardedTensors (state-dict keys -> ShardedTensor / factory).

    `model` is a `Qwen25VLModel` stage; `prefix` keeps several models apart in one checkpoint (the reference model is
    saved under "ref."). Parameters are referenced, not copied (`keep_vars`): the optimizer's sharded state dict
    finds its tensors by the parameters' identity."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    state = model.lm.sharded_state_dict(prefix=f"{prefix}lm.", metadata={"dp_cp_group": groups.dp})
    if model.vision is not None:
        # Replicated over TP and DP: replica id (0, tp rank, dp rank); only (0, 0, 0) is written.
        vision = model.vision.state_dict(prefix="", keep_vars=True)
        state.update(make_sharded_tensors_for_checkpoint(vision, f"{prefix}vision.", {}, (), tp_group=groups.tp,
                                                         dp_cp_group=groups.dp))
    return state


def rng_sharded_object(state: dict | None):
    """This rank's RNG state as a ShardedObject of a (world size,) grid; `state` None to load it."""
    from megatron.core.dist_checkpointing import ShardedObject

    return ShardedObject("rng", state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


# ---------------------------------------------------------------------------------------------------- save
@dataclass
class _Pending:
    directory: Path
    on_failure: Callable[[], None]
    what: str    # the failure's message head: which checkpoint was not saved, which one stays the newest


_RESULTS_MANAGER = None


def _shielded_results_queue() -> None:
    """Give megatron's checkpoint writer a results queue whose process survives the job's stop signal.

    megatron's writer processes report through a `Manager().Queue()` that megatron starts lazily in a spawned
    process. SLURM signals every process of a job step on preemption, so that process died of the SIGTERM the
    trainers catch to save a last checkpoint, and that save then failed (BrokenPipeError). Started here instead, the
    manager ignores stop signals and exits when this process is gone (megaapo.shield)."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megaapo.shield import shield_from_stop_signals

    global _RESULTS_MANAGER
    if filesystem_async._results_queue is not None and _RESULTS_MANAGER is not None:
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))   # the context megatron uses
    manager.start(initializer=shield_from_stop_signals, initargs=(os.getpid(),))
    _RESULTS_MANAGER = manager
    filesystem_async._results_queue = manager.Queue()


class Saver:
    """Writes a run's checkpoints; at most one save is in flight, and the next save waits for it.

    `save` is collective (every trainer rank, same order); so are `poll` (finalises a finished async save: call it at
    the same point of every step) and `wait` (blocks until the save in flight is committed). `commit` runs on every
    rank after all of them finished writing (megaapo.checkpoint's atomic rename); `on_failure` runs instead when a
    write or the commit failed, and the error is raised on every rank: a `rundir.WriteError` (one line: the file,
    the cause, what to do) for a filesystem failure, else a CheckpointError."""

    def __init__(self, groups, async_save: bool = True):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

        self.groups = groups
        # One writer process per rank on CPU (cores are scarce); megatron's default two on GPU nodes.
        threads = 2 if torch.cuda.is_available() else 1
        base = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=threads)
        # Replicated tensors are written by different data-parallel replicas (metadata-only planning, cached: the
        # structure of a run's checkpoints does not change).
        self.strategy = FullyParallelSaveStrategyWrapper(base, groups.dp, do_cache_distribution=True)
        self.queue = AsyncCallsQueue() if async_save else None
        self.pending: _Pending | None = None
        _shielded_results_queue()

    def save(self, state: dict, directory: Path, commit: Callable[[], None],
             on_failure: Callable[[], None], what: str) -> None:
        """Write `state` (a sharded state dict) into the existing, empty `directory`; commit when written."""
        from megatron.core import dist_checkpointing

        self.wait()
        self.pending = _Pending(Path(directory), on_failure, what)
        # Planning, common.pt (rank 0) and, with async save, the fork; the tensors are written by `request`.
        request = self._finalise(lambda: dist_checkpointing.save(state, str(directory), self.strategy,
                                                                 async_sharded_save=True), keep_pending=True)
        request.add_finalize_fn(commit)
        if self.queue is None:
            self._finalise(request.execute_sync)
        else:
            self.queue.schedule_async_request(request)

    def poll(self) -> None:
        """Commit the save in flight if every rank has finished writing it (collective, non-blocking)."""
        if self.queue is not None and self.pending is not None:
            self._finalise(lambda: self.queue.maybe_finalize_async_calls(blocking=False))

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and committed (collective)."""
        if self.queue is not None and self.pending is not None:
            self._finalise(lambda: self.queue.maybe_finalize_async_calls(blocking=True))

    @property
    def in_flight(self) -> bool:
        return self.pending is not None

    def _finalise(self, run: Callable, keep_pending: bool = False):
        """run(); a failure removes the uncommitted directory and is raised (megatron raises a failed write on every
        rank; the commit raises its own on every rank)."""
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        try:
            out = run()
        except (Exception, CheckpointException) as e:
            pending, self.pending = self.pending, None
            pending.on_failure()
            if isinstance(e, (rundir.WriteError, CheckpointError)):   # the commit's own, already phrased
                raise
            root = _root_cause(e)
            werr = rundir.as_write_error(root, pending.directory, pending.what)
            if werr is not None:
                raise werr from e
            raise CheckpointError(f"{pending.what}: {_rank_of(e)}{type(root).__name__}: {root}") from e
        if not keep_pending and (self.queue is None or self.queue.get_num_unfinalized_calls() == 0):
            self.pending = None
        return out

    def close(self, abort: bool = False) -> None:
        """End of the run: commit what is in flight, or (abort: the run is failing) stop the writer without
        committing, so the half-written checkpoint is never used."""
        if self.queue is None:
            return
        if abort:
            # No collective here (the other ranks may be gone): stop this rank's writer; the uncommitted `.tmp-`
            # directory is never read and the next save removes it.
            for call in self.queue.async_calls:
                call.async_caller.close(abort=True)
            self.queue.async_calls.clear()
            self.pending = None
        else:
            self.wait()
            self.queue.close()


def _root_cause(e: BaseException) -> BaseException:
    """The exception behind a (wrapped) write error: torch's CheckpointException holds each failing rank's
    exception, and megatron wraps a writer's OSError in a RuntimeError."""
    failures = getattr(e, "failures", None)
    if failures:
        return _root_cause(failures[min(failures)][0])
    while e.__cause__ is not None:
        e = e.__cause__
    # megatron's async writer passes a worker's OSError back as text: "Worker failure: [Errno 28] No space ..."
    m = None if isinstance(e, OSError) else re.search(r"\[Errno (\d+)\]", str(e))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else e


def _rank_of(e: BaseException) -> str:
    failures = getattr(e, "failures", None)
    return f"rank {min(failures)}: " if failures else ""


def storage_files(directory: Path) -> dict[str, int]:
    """Every file the torch_dist checkpoint in `directory` refers to, with the bytes its metadata says it holds
    (the commit checks them against the disk before the checkpoint becomes visible)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(directory)).read_metadata()
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    return need


# ------------------------------------------------------------------------------------------------ a run's checkpoints
FORMAT = 2
DIST = "dist"       # the torch_dist checkpoint (megatron-core's .metadata, common.pt, metadata.json, *.distcp)
HF = "hf"           # the model's config, tokenizer and processor files (what an HF export or a reshard needs)


def layout_of(groups) -> dict:
    return {"tp": groups.tp_size, "pp": groups.pp_size, "dp": groups.dp_size, "world": dist.get_world_size()}


class Checkpointer:
    """One run's checkpoints in format 2 under `root` (see megaapo.checkpoint for the directory protocol):

        step_000123/
            dist/        megatron-core torch_dist checkpoint of every rank's tensors (layout-free)
            hf/          config.json, tokenizer, processor of the model
            meta.json    the run's state (the loss-visible rank's `meta`)
            COMPLETE     the manifest: format 2, the layout that wrote it, every file with its size and checksum

    `save` is collective and returns once the save has started; state holding NaN/inf on any rank is refused before
    anything is written. The checkpoint becomes visible (renamed from its `.tmp-` name) only after every rank's write
    has finished and rank 0 has checked every file the torch_dist metadata names against the disk and checksummed
    every file (megaapo.integrity: what a resume verifies). A failed write or commit removes the `.tmp-` directory.
    `poll` at every step, `wait` before the run ends."""

    def __init__(self, root, groups, *, keep_last: int = 2, async_save: bool = True, checksum: bool = True):
        self.root, self.groups = Path(root), groups
        self.keep_last, self.checksum = keep_last, checksum
        self.saver = Saver(groups, async_save)
        self.rank0 = dist.get_rank() == 0

    def save(self, step: int, state: dict, meta: dict | None, hf_dir: Path | None = None) -> None:
        """Start writing `state` (a sharded state dict) as `step_N`; `meta` (JSON) from exactly one rank."""
        from megaapo import checkpoint as ckpt

        self.saver.wait()   # the previous save is committed before the next one starts
        metas = [None] * dist.get_world_size()
        dist.all_gather_object(metas, meta)
        metas = [m for m in metas if m is not None]
        if len(metas) != 1:
            raise ValueError(f"checkpoint meta came from {len(metas)} ranks; exactly one (the loss-visible) passes it")
        final = self.root / ckpt.step_dir_name(step)
        what = f"checkpoint {final.name} not saved (the newest complete one, {ckpt._newest(self.root)}, is untouched)"
        bad = integrity.agree(_nonfinite(state), dist.group.WORLD)
        if bad is not None:
            raise ckpt.nonfinite_error(what, bad)
        tmp = self.root / f"{final.name}.tmp-{uuid.uuid4().hex[:12]}"

        def make_tmp() -> None:
            with rundir.writing(self.root, what, probe=True):
                self.root.mkdir(parents=True, exist_ok=True)
                ckpt._remove_stale_tmp(self.root)
                (tmp / DIST).mkdir(parents=True)
                if hf_dir is not None:
                    _copy_side_files(Path(hf_dir), tmp / HF)

        _on_rank0(make_tmp)   # a failure (read-only, disk full) is raised on every rank
        box = [str(tmp)]
        dist.broadcast_object_list(box, src=0)   # rank 0's name
        tmp = Path(box[0])
        manifest = {"format": FORMAT, "step": step, "world_size": dist.get_world_size(),
                    "layout": layout_of(self.groups)}

        def commit() -> None:
            def on_rank0() -> None:
                try:
                    with rundir.writing(tmp, what, probe=True):
                        _write_meta(tmp, metas[0])
                        ckpt._commit(tmp, final, {**manifest, "files": _verified_files(tmp, self.checksum)})
                except rundir.WriteError:
                    raise
                except Exception as e:
                    raise CheckpointError(f"{what}: {e}") from e
                ckpt._prune_quietly(self.root, self.keep_last, protect=final)
            _on_rank0(on_rank0)   # every rank returns after the checkpoint is visible (or raises its error)

        def discard() -> None:
            if self.rank0:
                shutil.rmtree(tmp, ignore_errors=True)

        self.saver.save(state, tmp / DIST, commit, discard, what)

    def poll(self) -> None:
        self.saver.poll()

    def wait(self) -> None:
        self.saver.wait()

    def close(self, abort: bool = False) -> None:
        self.saver.close(abort)


def _on_rank0(fn: Callable[[], None]) -> None:
    """Run fn on rank 0 and raise its error on every rank (collective): rank 0 its own, the others one saying it."""
    err = None
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- reported on every rank below, so no rank waits on the others
            err = e
    box = [None if err is None else f"rank 0: {err}"]
    dist.broadcast_object_list(box, src=0)
    if err is not None:
        raise err
    if box[0] is not None:
        raise CheckpointError(box[0])


def _nonfinite(state: dict) -> str | None:
    """integrity.nonfinite over this rank's tensors of a sharded state dict (the local data of each sharded item)."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    def local(x):
        if isinstance(x, ShardedBase):
            return getattr(x, "data", None)
        if isinstance(x, dict):
            return {k: local(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [local(v) for v in x]
        return x

    with torch.no_grad():
        return integrity.nonfinite(local(state))


def _copy_side_files(src: Path, dst: Path) -> None:
    from megaapo.convert import _SIDE_FILES

    dst.mkdir(parents=True, exist_ok=True)
    for name in _SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _write_meta(tmp: Path, meta: dict) -> None:
    from megaapo import checkpoint as ckpt

    try:
        text = json.dumps(meta, indent=1, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"checkpoint meta must be JSON-serialisable: {e}") from None
    ckpt._write_durable(tmp / ckpt.META, text.encode())


def _verified_files(tmp: Path, checksum: bool) -> dict:
    """Every file of the finished checkpoint with its size and checksum; raises if a file the torch_dist metadata
    refers to is missing or shorter than the bytes it should hold."""
    from megaapo import checkpoint as ckpt

    for name, need in storage_files(tmp / DIST).items():
        f = tmp / DIST / name
        if not f.is_file() or f.stat().st_size < need:
            raise ckpt.CheckpointError(f"{f}: missing or shorter than the {need} bytes its metadata names")
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[str(f.relative_to(tmp))] = integrity.file_info(f, checksum)
    return files


# ---------------------------------------------------------------------------------------------------- load
def load(state: dict, directory: Path, groups) -> dict:
    """Read the tensors `state` (a sharded state dict built for loading) asks for from the checkpoint in
    `directory`, at this run's layout; returns them in `state`'s structure, in fresh tensors (the model and
    optimizer are untouched). Raises LoadError when the checkpoint lacks something or its shapes do not fit."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
    from megatron.core.dist_checkpointing.validation import StrictHandling

    _detach_targets(state)
    strategy = TorchDistLoadShardedStrategy()
    if groups.dp_size > 1:
        strategy = FullyParallelLoadStrategyWrapper(strategy, groups.dp)
    try:
        loaded, _, absent = dist_checkpointing.load(state, str(directory), strategy,
                                                    strict=StrictHandling.RETURN_UNEXPECTED)
    except CheckpointingException as e:
        raise LoadError(f"{directory}: {e}") from None
    if absent:
        names = sorted(absent)
        raise LoadError(f"{directory} lacks {len(names)} tensor(s) this run needs ({', '.join(names[:3])}"
                        f"{', ...' if len(names) > 3 else ''}): written for another model or another optim.impl?")
    return loaded


def _detach_targets(state: dict) -> None:
    """Point every tensor of a loading state dict at a fresh host buffer of the same shape: dist_checkpointing reads
    in place, and the live parameters must change only once the whole checkpoint has been read (on GPU the staging
    stays in host memory; the caller copies it into the model)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def fresh(x):
        if isinstance(x, (ShardedTensor, ShardedTensorFactory)) and x.data is not None:
            x.data = torch.empty_like(x.data.detach(), device="cpu")
        return x

    dict_list_map_inplace(fresh, state)


def read(path, state: dict, groups, verified: bool = False) -> tuple[dict, dict]:
    """(the tensors `state` asks for, the run meta) of the complete format-2 checkpoint at `path` (collective).
    Every file's size and checksum are verified first (the hashing shared by the ranks), unless `verified`
    (`checkpoint.resolve_resume` has just done it)."""
    from megaapo import checkpoint as ckpt

    path = Path(path)
    bad = None if verified else integrity.verify_together(path, dist.group.WORLD)
    if bad is not None:
        raise ckpt.CheckpointError(f"{path} is not a complete checkpoint: {bad}; checkpoint.resume=auto picks the "
                                   "newest complete one")
    loaded = load(state, path / DIST, groups)
    return loaded, json.loads((path / ckpt.META).read_text())


def format_of(path) -> int:
    from megaapo import checkpoint as ckpt

    return int(ckpt.read_manifest(path).get("format", 1))


def same_layout(path, groups) -> bool:
    """Whether the checkpoint at `path` was written at this run's TP x PP x DP (its RNG streams then apply)."""
    from megaapo import checkpoint as ckpt

    return ckpt.read_manifest(path).get("layout") == layout_of(groups)


def load_policy(path, groups, model_cfg, parallel_cfg, optim_cfg=None):
    """A learner at this run's layout holding the policy of the format-2 checkpoint at `path` (its weights, and
    with `optim_cfg` its optimizer state), built from the checkpoint's own `hf/` config: `megaapo eval` and
    `megaapo convert` read checkpoints without the model they were trained from. Collective."""
    from megaapo.learner import Learner

    learner = Learner(Path(path) / HF, groups, model_cfg, parallel_cfg, optim_cfg, load_weights=False)
    loaded, _ = read(path, {"policy": learner.sharded_state_dict(is_loading=True)}, groups)
    learner.load_sharded_state_dict(loaded["policy"])
    return learner
