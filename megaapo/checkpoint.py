"""Checkpoint directories: atomic commit, verified resume, RNG and train-state capture, and the pre-emption stop flag.

Who calls it: `megaapo/run.py` (RL and SFT), `megaapo.dist_checkpoint` (which writes a run's tensors) and
`megaapo.legacy_checkpoint`. A run's checkpoints are format 2: the learner's tensors through megatron-core's
dist_checkpointing (megaapo.dist_checkpoint, layout-free) committed here. `save`/`load` below are format 1
(megaapo's own per-rank shards, tied to the layout that wrote them): what checkpoints were before, still read by
`legacy_checkpoint` (converted on load or by `megaapo convert reshard`). On start, `resolve_resume` picks and verifies
the checkpoint (all ranks together). `StopFlag` turns SIGTERM/SIGUSR1 (SLURM pre-emption) into a flag the loop
checks at a safe point, then saves and exits.

Layout of one checkpoint (`step_N` = the state after N completed steps; the next step to run is N):
    <root>/step_000123/
        dist/ hf/                  format 2: see megaapo.dist_checkpoint
        model.rank0.safetensors    format 1: a flat {name: tensor} shard -> safetensors
        optim.rank0.pt             format 1: anything else (optimizer, RNG) -> torch.save
        meta.json                  the loss-visible rank's `meta` (the JSON train state)
        COMPLETE                   the manifest (JSON): format, step, every file with its size and checksum

Write protocol (both formats): the ranks first agree that no tensor holds NaN/inf (such a checkpoint is never
written). Rank 0 removes stale `*.tmp-*` dirs and creates `step_N.tmp-<uuid>`; every rank writes its files there;
the ranks agree that every write succeeded (else rank 0 removes the tmp dir and every rank raises, the failing one
with the path and cause); rank 0 checks and checksums the files, writes COMPLETE, fsyncs it and the directory,
renames the directory to `step_N` (atomic on POSIX), fsyncs the root, and prunes to the newest `keep_last`, never
the one just written (`_commit`, `prune`). A crash at any point leaves either no `step_N` or a complete one.

Read protocol: a checkpoint is used only after its manifest, every file's size and every file's checksum match
(the hashing shared by the ranks); `resolve_resume` with `auto` takes the newest that passes, warns about each newer
one it skips and why, and refuses to start at all when checkpoints exist but none passes.

One writer per root: the run directory's lock (`megaapo.rundir`) keeps a second job out.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np
import torch

from megaapo import integrity
from megaapo.config import CheckpointConfig
from megaapo.integrity import MARKER, read_manifest
from megaapo.rundir import WriteError, as_write_error, writing

log = logging.getLogger(__name__)

META = "meta.json"
_PARTS = "_parts"
_STEP_RE = re.compile(r"^step_(\d+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
PathLike = Union[str, Path]
__all__ = ["MARKER", "read_manifest"]   # re-exported: callers read manifests through this module


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit this run; the message names it and the fix."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_root(cfg: CheckpointConfig, output_dir: PathLike) -> Path:
    """`checkpoint.dir`, or `<trainer.output_dir>/checkpoints` when it is empty."""
    return Path(cfg.dir) if cfg.dir else Path(output_dir) / "checkpoints"


# ---------------------------------------------------------------------------------------------------- save
class _Comm:
    """What `save` needs from the ranks: a barrier, rank 0's tmp dir name, and agreement on problems."""

    def __init__(self, group: Any, barrier: Optional[Callable[[], None]], rank: Optional[int],
                 world_size: Optional[int]) -> None:
        self.group = group
        if group is not None:
            import torch.distributed as dist

            self.rank = dist.get_rank(group)
            if rank is not None and rank != self.rank:
                raise ValueError(f"save: rank={rank} but this process is rank {self.rank} of the group; with a group, "
                                 "leave rank out (shard files are named by the rank in the group)")
            self.world_size = dist.get_world_size(group)
            self._barrier = lambda: dist.barrier(group=group)
        else:
            self.rank = rank or 0
            self.world_size = world_size or 1
            if self.world_size > 1 and barrier is None:
                raise ValueError("save with world_size > 1 needs a process group or a barrier callable")
            self._barrier = barrier or (lambda: None)

    def barrier(self) -> None:
        self._barrier()

    def agree(self, problem: Optional[str]) -> Optional[str]:
        """The first problem of any rank (also a barrier). Without a group only this rank's: the others then learn
        of a failure as their barrier's timeout."""
        if self.group is None:
            self.barrier()
            return problem
        return integrity.agree(problem, self.group)

    def share_tmp(self, tmp: Optional[Path], root: Path, final_name: str) -> Optional[Path]:
        """Rank 0's tmp dir on every rank (None everywhere when rank 0 could not make it)."""
        if self.world_size == 1:
            return tmp
        if self.group is not None:
            import torch.distributed as dist

            box = [str(tmp) if tmp is not None else None]
            # also the barrier: the others wait here until rank 0 has made the directory
            dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
            return Path(box[0]) if box[0] else None
        # rank 0 removed every stale tmp dir before making its own, so exactly one is left; NFS may show other
        # nodes a stale listing for a few seconds, which is why a process group (broadcast) is preferred
        self.barrier()
        if self.rank == 0:
            return tmp
        found = sorted(root.glob(f"{final_name}.tmp-*"))
        if len(found) != 1:
            raise CheckpointError(f"rank {self.rank}: expected one {final_name}.tmp-* in {root}, found "
                                  f"{[p.name for p in found]}; is another job writing checkpoints there?")
        return found[0]


def save(ckpt_root: PathLike, step: int, shards: dict[str, Any], meta: Optional[dict] = None, keep_last: int = 2,
         *, rank: Optional[int] = None, world_size: Optional[int] = None, group: Any = None,
         barrier: Optional[Callable[[], None]] = None, checksum: bool = True) -> Path:
    """Write this rank's `shards` (name -> a flat {str: Tensor} dict or any torch-saveable state) into `step_N`.

    All ranks call it together. Pass `group` (a torch.distributed ProcessGroup over the trainer ranks; files are
    named by the rank in it) or, for several ranks, `barrier` plus `rank` and `world_size`. Exactly one rank passes
    `meta` (JSON-serialisable). Returns the final directory once it is complete on every rank. Raises on every rank
    (with a group) when any rank's state holds NaN/inf (CheckpointError; nothing written) or a write failed
    (WriteError on the failing rank, CheckpointError naming it elsewhere; the tmp dir is removed).
    """
    comm = _Comm(group, barrier, rank, world_size)
    root = Path(ckpt_root)
    final = root / step_dir_name(step)
    what = f"checkpoint {final.name} not saved (the newest complete one, {_newest(root)}, is untouched)"
    bad = comm.agree(integrity.nonfinite(shards))
    if bad is not None:
        raise nonfinite_error(what, bad)
    tmp, err = None, None
    if comm.rank == 0:
        try:
            with writing(root, what):
                root.mkdir(parents=True, exist_ok=True)
                _remove_stale_tmp(root)
                tmp = root / f"{final.name}.tmp-{uuid.uuid4().hex[:12]}"
                (tmp / _PARTS).mkdir(parents=True)
        except WriteError as e:
            err, tmp = e, None
    tmp = comm.share_tmp(tmp, root, final.name)
    if tmp is None:
        raise err or CheckpointError(f"{what}: rank 0 could not create its directory in {root}")
    err = _attempt(lambda: _write_parts(tmp, comm.rank, shards, meta, checksum), tmp, what)
    _settle(comm, err, tmp, what)
    if comm.rank == 0:
        err = _attempt(lambda: _finalise(tmp, final, step, comm.world_size), tmp, what)
        if err is None:
            _prune_quietly(root, keep_last, protect=final)
    _settle(comm, err if comm.rank == 0 else None, tmp, what)   # nobody returns before the checkpoint is final
    return final


def nonfinite_error(what: str, bad: str) -> CheckpointError:
    """The refusal to write a checkpoint whose state holds NaN/inf (`bad` says which tensors)."""
    return CheckpointError(f"{what}: {bad}; the policy diverged (a non-finite update got through, or non-finite "
                           "weights were loaded): resume from the last good checkpoint, e.g. with a lower optim.lr")


def _attempt(fn: Callable[[], Any], path: Path, what: str) -> Optional[BaseException]:
    """Run fn; a failure is returned (a filesystem one as a WriteError naming the file), not raised."""
    try:
        fn()
        return None
    except Exception as e:  # noqa: BLE001 -- every rank must learn of it before anyone raises
        werr = as_write_error(e, path, what)
        if werr is None:
            return e
        werr.what = werr.what or what
        return werr


def _settle(comm: _Comm, err: Optional[BaseException], tmp: Path, what: str) -> None:
    """Agree on failures; on any, rank 0 removes the tmp dir and every rank raises (its own error, or one naming
    the failing rank's)."""
    problem = comm.agree(None if err is None else f"rank {comm.rank}: {err}")
    if problem is None:
        return
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if err is not None:
        raise err
    raise CheckpointError(problem if what in problem else f"{what}: {problem}")


def _write_parts(tmp: Path, rank: int, shards: dict, meta: Optional[dict], checksum: bool) -> None:
    files = _write_shards(tmp, rank, shards, meta, checksum)
    _write_durable(tmp / _PARTS / f"rank{rank}.json", json.dumps(files).encode())


def _write_shards(tmp: Path, rank: int, shards: dict[str, Any], meta: Optional[dict], checksum: bool) -> dict:
    """The tensor I/O: one file per shard. Returns {file name: manifest entry} of what this rank wrote."""
    from safetensors.torch import save_file

    files: dict[str, dict] = {}
    for name, state in shards.items():
        if not _NAME_RE.match(name):
            raise ValueError(f"shard name {name!r}: use letters, digits, '_' and '-' only (it becomes a file name)")
        tensor_dict = _is_tensor_dict(state)
        path = tmp / f"{name}.rank{rank}.{'safetensors' if tensor_dict else 'pt'}"
        with writing(path, probe=True):
            if tensor_dict:
                save_file(_detach_unshared(state), str(path))
                _fsync_path(path)
            else:
                with open(path, "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())
        files[path.name] = integrity.file_info(path, checksum)
    if meta is not None:
        try:
            text = json.dumps(meta, indent=1, sort_keys=True)
        except TypeError as e:
            raise TypeError(f"checkpoint meta must be JSON-serialisable: {e}") from None
        with writing(tmp / META, probe=True):
            _write_durable(tmp / META, text.encode())
        files[META] = integrity.file_info(tmp / META, checksum)
    return files


def _is_tensor_dict(state: Any) -> bool:
    return (isinstance(state, dict) and len(state) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()))


def _detach_unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors owning their storage: safetensors refuses shared storage (tied embeddings, params
    that are views into one flat buffer as in megatron's DDP)."""
    out, seen = {}, set()
    for k, t in state.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()   # a copy: owns its storage
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _finalise(tmp: Path, final: Path, step: int, world_size: int) -> None:
    parts = sorted((tmp / _PARTS).glob("rank*.json"))
    if len(parts) != world_size:
        raise CheckpointError(f"{tmp}: {len(parts)} of {world_size} ranks reported their shards")
    files: dict[str, dict] = {}
    for p in parts:
        files.update(json.loads(p.read_text()))
    if META not in files:
        raise CheckpointError(f"{tmp}: no rank passed `meta`; the loss-visible rank must pass the train state")
    for name, info in files.items():
        size = (tmp / name).stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{tmp / name}: {size} bytes on disk, {info['size']} written")
    shutil.rmtree(tmp / _PARTS)
    _commit(tmp, final, {"format": 1, "step": step, "world_size": world_size, "files": files})


def _commit(tmp: Path, final: Path, manifest: dict) -> None:
    """Write the COMPLETE manifest into the finished `tmp` directory and rename it to `final` (atomic)."""
    manifest = {**manifest, "created": time.time()}
    _write_durable(tmp / MARKER, json.dumps(manifest, indent=1, sort_keys=True).encode())
    _fsync_path(tmp)
    old = None
    if final.exists():   # the same step saved again (pre-emption right after a periodic save): swap, then delete
        old = final.with_name(f"{final.name}.tmp-old-{uuid.uuid4().hex[:12]}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune(ckpt_root: PathLike, keep_last: int, protect: Optional[PathLike] = None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, never `protect` (`save` passes the checkpoint it
    has just written and checksummed: older-numbered than newer leftovers, it must still survive); returns what was
    deleted. Each is renamed to a `.tmp-` name first, so a crash mid-delete leaves something the next save cleans up
    rather than a `step_N` with missing files. Directories that are not complete checkpoints are left alone.
    """
    keep = Path(protect) if protect is not None else None
    complete = [p for _, p in _step_dirs(Path(ckpt_root)) if integrity.check_structure(p)[0] is None]
    doomed = [p for p in complete[keep_last:] if p != keep]
    for p in doomed:
        trash = p.with_name(f"{p.name}.tmp-del-{uuid.uuid4().hex[:12]}")
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def _prune_quietly(root: Path, keep_last: int, protect: Path) -> None:
    try:
        prune(root, keep_last, protect)
    except OSError as e:   # the new checkpoint is complete; an old one left behind is no reason to stop
        log.warning("could not prune old checkpoints in %s: %s", root, e)


def _newest(root: Path) -> str:
    return next((p.name for _, p in _step_dirs(root) if integrity.check_structure(p)[0] is None), "none")


def _remove_stale_tmp(root: Path) -> None:
    for p in root.glob("step_*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- find / load
def list_checkpoints(root: PathLike) -> list[tuple[int, Path]]:
    """(N, path) of the `step_N` directories under root, complete or not, newest first (tmp dirs never match)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(out, reverse=True)


_step_dirs = list_checkpoints


def check_complete(path: PathLike) -> Optional[str]:
    """None when `path` is a complete checkpoint with intact files (checksums included), else why not."""
    return integrity.verify(path)


class Scan(NamedTuple):
    latest: Optional[Path]                # the newest checkpoint that passed verification
    refused: list[tuple[Path, str]]       # newer ones that did not, with the reason


def scan(ckpt_root: PathLike, group: Any = None) -> Scan:
    """Verify `step_N` directories newest first until one passes (collective over `group`, which shares the
    hashing; every rank gets the same answer). Each refused one is logged with its reason."""
    refused = []
    for _, p in _step_dirs(Path(ckpt_root)):
        problem = integrity.verify_together(p, group)
        if problem is None:
            return Scan(p, refused)
        log.warning("skipping checkpoint %s: %s", p, problem)
        refused.append((p, problem))
    return Scan(None, refused)


def find_latest(ckpt_root: PathLike, group: Any = None) -> Optional[Path]:
    """The newest verified checkpoint under `ckpt_root`, or None; unusable ones are skipped with a warning."""
    return scan(ckpt_root, group).latest


class Loaded(NamedTuple):
    path: Path
    step: int
    shards: dict        # name -> what this rank passed to `save`
    meta: dict          # the loss-visible rank's `meta`


def load(path: PathLike, rank: int = 0, map_location: Union[str, torch.device] = "cpu",
         weights_only: bool = True, verified: bool = False) -> Loaded:
    """This rank's shards and the shared meta of a complete checkpoint. The files it reads are checked against the
    manifest's sizes and checksums first, unless `verified` (`resolve_resume` already checked every file).

    weights_only=True refuses arbitrary pickled objects; pass False only for checkpoints you wrote yourself whose
    optimizer state holds custom classes.
    """
    from safetensors.torch import load_file

    path = Path(path)
    problem, files = integrity.check_structure(path)
    mine = sorted(n for n in files if f".rank{rank}." in n)
    if problem is None and not verified:
        problem = integrity.check_files(path, files, mine + [META])
    if problem is not None:
        raise CheckpointError(f"{path} is not a complete checkpoint: {problem}; checkpoint.resume=auto picks the "
                              f"newest complete one")
    manifest = read_manifest(path)
    if rank >= manifest["world_size"]:
        raise CheckpointError(f"{path} was written by {manifest['world_size']} trainer ranks, this is rank {rank}: "
                              "resume with the same TP x PP x DP layout (resharding is not supported)")
    shards: dict[str, Any] = {}
    for name in mine:
        shard = name.split(f".rank{rank}.")[0]
        if name.endswith(".safetensors"):
            shards[shard] = load_file(str(path / name), device=str(map_location))
        else:
            shards[shard] = torch.load(path / name, map_location=map_location, weights_only=weights_only)
    meta = json.loads((path / META).read_text())
    return Loaded(path, int(manifest["step"]), shards, meta)


def read_meta(path: PathLike) -> dict:
    """The run state (`meta.json`) of a complete checkpoint."""
    return json.loads((Path(path) / META).read_text())


def why_this_checkpoint(ckpt_root: PathLike, chosen: PathLike) -> str:
    """Why `chosen` is the checkpoint a resume takes, in a few words: it is the newest, or which newer saves were not
    committed (a save killed mid-write leaves a `step_N.tmp-*` directory) or are incomplete."""
    chosen, root = Path(chosen), Path(ckpt_root)
    m = _STEP_RE.match(chosen.name)
    if chosen.parent != root or m is None:
        return "the checkpoint asked for (checkpoint.resume)"
    step = int(m.group(1))
    newer = []
    for p in sorted(root.glob("step_*")) if root.is_dir() else []:
        n = re.match(r"^step_(\d+)(\.tmp-.*)?$", p.name)
        if n is None or int(n.group(1)) <= step or ".tmp-old-" in p.name or ".tmp-del-" in p.name:
            continue
        if n.group(2):
            newer.append(f"step_{n.group(1)} was not committed (its save was interrupted: {p.name} has no {MARKER})")
        else:   # `scan` verified it and logged why it was refused
            newer.append(f"{p.name} failed verification")
    return "the newest complete checkpoint" + (f"; {'; '.join(newer)}" if newer else "")


def resolve_resume(cfg: CheckpointConfig, ckpt_root: PathLike, group: Any = None) -> Optional[Path]:
    """The checkpoint to resume from (collective over `group`: every rank gets the same answer), verified:
    `none` -> None; `auto` -> the newest usable one under ckpt_root, None when there are no checkpoints at all, an
    error listing each one and why it was refused when there are some but none is usable; a path -> that
    checkpoint (or the newest usable one under a checkpoint root)."""
    choice = (cfg.resume or "").strip()
    if choice == "none":
        return None
    if not choice:
        raise CheckpointError("checkpoint.resume is empty: use auto, none or a checkpoint directory")
    if choice == "auto":
        return _newest_usable(Path(ckpt_root), group, "checkpoint.resume=auto")
    p = Path(choice).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"checkpoint.resume={choice}: no such directory; give a step_NNNNNN checkpoint "
                              f"directory, or checkpoint.resume=auto (newest complete under {ckpt_root}) or none")
    if not _STEP_RE.match(p.name) and not (p / MARKER).exists():
        latest = _newest_usable(p, group, f"checkpoint.resume={choice}")
        if latest is None:
            raise CheckpointError(f"checkpoint.resume={choice}: no complete step_NNNNNN checkpoint in it")
        return latest
    problem = integrity.verify_together(p, group)
    if problem is not None:
        raise CheckpointError(f"checkpoint.resume={choice}: not a complete checkpoint ({problem}); pick another, "
                              f"or checkpoint.resume=auto for the newest complete one")
    return p


def _newest_usable(root: Path, group: Any, setting: str) -> Optional[Path]:
    found = scan(root, group)
    if found.latest is not None or not found.refused:
        return found.latest
    listing = "; ".join(f"{p.name}: {why}" for p, why in found.refused)
    raise CheckpointError(
        f"{setting}: none of the {len(found.refused)} checkpoint(s) in {root} can be resumed ({listing}). No "
        "checkpoint or metric was changed. Restore or remove them, resume one explicitly (checkpoint.resume=DIR), or start afresh with "
        "checkpoint.resume=none (the earlier metrics and checkpoints are then moved to a history/ folder)")


# ---------------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Where the run is, saved as meta["train_state"]. step = completed steps (also the index of the next step)."""
    step: int = 0
    weight_version: int = 0
    data_position: dict = field(default_factory=dict)   # the sampler's own state: epoch, index, seed, ...
    run_id: Optional[str] = None                        # W&B run id, so a resumed run continues the same W&B run
    # Generation state a resume needs beyond the data position: under asynchronous RL, the prompts in flight
    # (issued to the engines, not yet trained on), so that after a crash none is lost or repeated.
    rollout: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        unknown = set(d) - set(known)
        if unknown:
            raise CheckpointError(f"train state has unknown keys {sorted(unknown)}: written by another version?")
        return cls(**known)


def capture_rng() -> dict:
    """Python, numpy (global), torch CPU and the current CUDA device's RNG state, as weights_only-loadable types."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this rank's device only: get_rng_state_all() would open a context on every visible GPU from every rank
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    """Undo `capture_rng`. The CUDA state goes to the current device: it belongs to the rank, not to the GPU index."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:
            log.warning("checkpoint holds a CUDA RNG state but no GPU is visible: CUDA sampling will not replay")


# ---------------------------------------------------------------------------------------------------- HF export
_HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def export_hf(state_dict: dict[str, torch.Tensor], out_dir: PathLike, source_dir: Optional[PathLike] = None,
              max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `state_dict` (already in HF names, gathered onto this one rank) as an HF safetensors model directory,
    sharded with a `model.safetensors.index.json` past `max_shard_bytes`; copy the non-weight files (config,
    tokenizer, processor, chat template) from `source_dir`. Atomic like `save`: a tmp dir renamed into place; a
    failed write removes the tmp dir, leaves an earlier export as it was and raises a WriteError."""
    out = Path(out_dir)
    with writing(out, f"export to {out} failed (an earlier export there is untouched)"):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:12]}")
        tmp.mkdir()
        try:
            _write_hf(tmp, _detach_unshared(state_dict), source_dir, max_shard_bytes)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, out)
    return out


def _write_hf(tmp: Path, tensors: dict[str, torch.Tensor], source_dir: Optional[PathLike], max_shard_bytes: int):
    from safetensors.torch import save_file

    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][k] = t
        size += t.nbytes
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    for name, group in zip(names, groups):
        with writing(tmp / name, probe=True):
            save_file(group, str(tmp / name), metadata={"format": "pt"})   # transformers checks the format tag
            _fsync_path(tmp / name)
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {k: name for name, g in zip(names, groups) for k in g}}
        _write_durable(tmp / "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True).encode())
    if source_dir is not None:
        for f in Path(source_dir).iterdir():
            if f.is_file() and not f.name.endswith(_HF_WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
    _fsync_path(tmp)


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished directory `tmp` at `out`: the old `out` is renamed away first and deleted only after."""
    old = out.with_name(f"{out.name}.tmp-old-{uuid.uuid4().hex[:12]}") if out.exists() else None
    if old is not None:
        os.rename(out, old)
    os.rename(tmp, out)
    _fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- signals
class StopFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM sends them before pre-emption or the time limit); the loop checks it after a
    step, saves and exits. The handler only records the signal: saving inside it would run in the middle of
    whatever the main thread was doing (a collective, a half-written file)."""

    DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.count = 0
        self._previous: dict[int, Any] = {}

    def install(self, signals: tuple = DEFAULT_SIGNALS) -> "StopFlag":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopFlag.install must run in the main thread (Python delivers signals only there)")
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self.count += 1

    def restore(self) -> None:
        """Put back the handlers that were there before `install`."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def is_set(self) -> bool:
        return self.signum is not None

    __bool__ = is_set

    @property
    def name(self) -> Optional[str]:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def any_rank(self, group: Any = None, device: Union[str, torch.device] = "cpu") -> bool:
        """True on every rank when any rank got the signal, so all of them save at the same step (a collective:
        every rank must call it at the same point; device must suit the group's backend, e.g. cuda for NCCL)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.is_set()
        t = torch.tensor([1 if self.is_set() else 0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return bool(t.item())


def install_stop_handler(signals: tuple = StopFlag.DEFAULT_SIGNALS) -> StopFlag:
    """A `StopFlag` listening to `signals` (call from the main thread before the loop; `.restore()` undoes it)."""
    return StopFlag().install(signals)
