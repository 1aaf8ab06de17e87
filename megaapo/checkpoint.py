"""Atomic sharded checkpoints, auto-resume, RNG and train-state capture, HF export, and the pre-emption stop flag.

Who calls it: `megaapo/train.py` (and sft). Every trainer rank calls `save` at the same step with its own shards
(learner weights, optimizer state, RNG state); the loss-visible rank also passes `meta` (the JSON train state and
config). On start, `resolve_resume` picks the checkpoint and each rank `load`s its own shards. `StopFlag` turns
SIGTERM/SIGUSR1 (SLURM pre-emption) into a flag the loop checks at a safe point, then saves and exits. At the end
`export_hf` writes the final policy (already mapped to HF names by the model's weight maps) as an HF directory.

Layout of one checkpoint (`step_N` = the state after N completed steps; the next step to run is N):
    <root>/step_000123/
        model.rank0.safetensors    a flat {name: tensor} shard -> safetensors
        optim.rank0.pt             anything else (optimizer, RNG) -> torch.save, loaded with weights_only=True
        meta.json                  the loss-visible rank's `meta`
        COMPLETE                   the manifest (JSON): every file with its size (and sha256 if asked)

Write protocol: rank 0 removes stale `*.tmp-*` dirs and creates `step_N.tmp-<uuid>`; every rank writes and fsyncs
its files there plus a small part-list; barrier; rank 0 merges the part-lists into COMPLETE, fsyncs it and the
directory, renames the directory to `step_N` (atomic on POSIX), fsyncs the root, prunes to the newest `keep_last`;
barrier. A crash at any point leaves either no `step_N` or a complete one, and `find_latest` only trusts a `step_N`
whose COMPLETE manifest matches the files on disk, so a torn directory is never loaded.

One writer per root: concurrent jobs writing into the same root would delete each other's temporary directories.
"""

from __future__ import annotations

import hashlib
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

from megaapo.config import CheckpointConfig

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
META = "meta.json"
_PARTS = "_parts"
_STEP_RE = re.compile(r"^step_(\d+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
PathLike = Union[str, Path]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit this run; the message names it and the fix."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_root(cfg: CheckpointConfig, output_dir: PathLike) -> Path:
    """`checkpoint.dir`, or `<trainer.output_dir>/checkpoints` when it is empty."""
    return Path(cfg.dir) if cfg.dir else Path(output_dir) / "checkpoints"


# ---------------------------------------------------------------------------------------------------- save
class _Comm:
    """The two things `save` needs from the ranks: a barrier, and everyone learning rank 0's tmp dir name."""

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

    def share_tmp(self, tmp: Optional[Path], root: Path, final_name: str) -> Path:
        if self.world_size == 1:
            assert tmp is not None
            return tmp
        if self.group is not None:
            import torch.distributed as dist

            box = [str(tmp) if tmp is not None else None]
            # also the barrier: the others wait here until rank 0 has made the directory
            dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
            return Path(box[0])
        # rank 0 removed every stale tmp dir before making its own, so exactly one is left; NFS may show other
        # nodes a stale listing for a few seconds, which is why a process group (broadcast) is preferred
        self.barrier()
        found = sorted(root.glob(f"{final_name}.tmp-*"))
        if len(found) != 1:
            raise CheckpointError(f"rank {self.rank}: expected one {final_name}.tmp-* in {root}, found "
                                  f"{[p.name for p in found]}; is another job writing checkpoints there?")
        return found[0]


def save(ckpt_root: PathLike, step: int, shards: dict[str, Any], meta: Optional[dict] = None, keep_last: int = 2,
         *, rank: Optional[int] = None, world_size: Optional[int] = None, group: Any = None,
         barrier: Optional[Callable[[], None]] = None, checksum: bool = False) -> Path:
    """Write this rank's `shards` (name -> a flat {str: Tensor} dict or any torch-saveable state) into `step_N`.

    All ranks call it together. Pass `group` (a torch.distributed ProcessGroup over the trainer ranks; files are
    named by the rank in it) or, for several ranks, `barrier` plus `rank` and `world_size`. Exactly one rank passes
    `meta` (JSON-serialisable). Returns the final directory once it is complete on every rank. An error on one rank
    (disk full) reaches the others as the group's barrier timeout.
    """
    comm = _Comm(group, barrier, rank, world_size)
    root = Path(ckpt_root)
    final = root / step_dir_name(step)
    tmp = None
    if comm.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root)
        tmp = root / f"{final.name}.tmp-{uuid.uuid4().hex[:12]}"
        (tmp / _PARTS).mkdir(parents=True)
    tmp = comm.share_tmp(tmp, root, final.name)
    files = _write_shards(tmp, comm.rank, shards, meta, checksum)
    _write_durable(tmp / _PARTS / f"rank{comm.rank}.json", json.dumps(files).encode())
    comm.barrier()
    if comm.rank == 0:
        _finalise(tmp, final, step, comm.world_size)
        prune(root, keep_last)
    comm.barrier()   # nobody returns (and perhaps exits) before the checkpoint is final
    return final


def _write_shards(tmp: Path, rank: int, shards: dict[str, Any], meta: Optional[dict], checksum: bool) -> dict:
    from safetensors.torch import save_file

    files: dict[str, dict] = {}
    for name, state in shards.items():
        if not _NAME_RE.match(name):
            raise ValueError(f"shard name {name!r}: use letters, digits, '_' and '-' only (it becomes a file name)")
        if _is_tensor_dict(state):
            path = tmp / f"{name}.rank{rank}.safetensors"
            save_file(_detach_unshared(state), str(path))
            _fsync_path(path)
        else:
            path = tmp / f"{name}.rank{rank}.pt"
            with open(path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        files[path.name] = _file_info(path, checksum)
    if meta is not None:
        try:
            text = json.dumps(meta, indent=1, sort_keys=True)
        except TypeError as e:
            raise TypeError(f"checkpoint meta must be JSON-serialisable: {e}") from None
        _write_durable(tmp / META, text.encode())
        files[META] = _file_info(tmp / META, checksum)
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
    manifest = {"format": 1, "step": step, "world_size": world_size, "created": time.time(), "files": files}
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


def prune(ckpt_root: PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints; returns what was deleted.

    Each is renamed to a `.tmp-` name first, so a crash mid-delete leaves something the next save cleans up
    rather than a `step_N` with missing files. Directories that are not complete checkpoints are left alone.
    """
    complete = [p for _, p in _step_dirs(Path(ckpt_root)) if check_complete(p) is None]
    doomed = complete[keep_last:]
    for p in doomed:
        trash = p.with_name(f"{p.name}.tmp-del-{uuid.uuid4().hex[:12]}")
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


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


def _file_info(path: Path, checksum: bool) -> dict:
    info: dict[str, Any] = {"size": path.stat().st_size}
    if checksum:
        info["sha256"] = _sha256(path)
    return info


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- find / load
def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """`step_N` directories under root, newest first (tmp dirs never match)."""
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(out, reverse=True)


def read_manifest(path: PathLike) -> dict:
    return json.loads((Path(path) / MARKER).read_text())


def check_complete(path: PathLike, checksum_files: Optional[set] = None) -> Optional[str]:
    """None when `path` is a complete checkpoint, else why not. Sizes are always checked; sha256 only for the
    names in `checksum_files` that recorded one (hashing every shard on every scan would cost minutes)."""
    path = Path(path)
    if not (path / MARKER).is_file():
        return f"no {MARKER} marker (a save that did not finish)"
    try:
        files = read_manifest(path)["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {MARKER} manifest ({e})"
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info.get("size"):
            return f"{name} has {f.stat().st_size} bytes, the manifest says {info.get('size')}"
        if checksum_files and name in checksum_files and "sha256" in info and _sha256(f) != info["sha256"]:
            return f"{name} fails its sha256 check"
    return None


def find_latest(ckpt_root: PathLike) -> Optional[Path]:
    """The newest complete checkpoint under `ckpt_root`, or None; incomplete ones are skipped with a warning."""
    for _, p in _step_dirs(Path(ckpt_root)):
        problem = check_complete(p)
        if problem is None:
            return p
        log.warning("skipping checkpoint %s: %s", p, problem)
    return None


class Loaded(NamedTuple):
    path: Path
    step: int
    shards: dict        # name -> what this rank passed to `save`
    meta: dict          # the loss-visible rank's `meta`


def load(path: PathLike, rank: int = 0, map_location: Union[str, torch.device] = "cpu",
         weights_only: bool = True) -> Loaded:
    """This rank's shards and the shared meta of a complete checkpoint; sha256 (if recorded) checked on what it reads.

    weights_only=True refuses arbitrary pickled objects; pass False only for checkpoints you wrote yourself whose
    optimizer state holds custom classes.
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a complete checkpoint ({e}); checkpoint.resume=auto picks the newest "
                              f"complete one") from None
    mine = {n for n in manifest["files"] if f".rank{rank}." in n}
    problem = check_complete(path, checksum_files=mine | {META})
    if problem is not None:
        raise CheckpointError(f"{path} is not a complete checkpoint: {problem}; checkpoint.resume=auto picks the "
                              f"newest complete one")
    if rank >= manifest["world_size"]:
        raise CheckpointError(f"{path} was written by {manifest['world_size']} trainer ranks, this is rank {rank}: "
                              "resume with the same TP x PP x DP layout (resharding is not supported)")
    shards: dict[str, Any] = {}
    for name in sorted(mine):
        shard = name.split(f".rank{rank}.")[0]
        if name.endswith(".safetensors"):
            shards[shard] = load_file(str(path / name), device=str(map_location))
        else:
            shards[shard] = torch.load(path / name, map_location=map_location, weights_only=weights_only)
    meta = json.loads((path / META).read_text())
    return Loaded(path, int(manifest["step"]), shards, meta)


def resolve_resume(cfg: CheckpointConfig, ckpt_root: PathLike) -> Optional[Path]:
    """The checkpoint to resume from: `none` -> None; `auto` -> the newest complete one under ckpt_root (None if
    there is none: a fresh start); a path -> that checkpoint (or the newest complete one under a checkpoint root)."""
    choice = (cfg.resume or "").strip()
    if choice == "none":
        return None
    if choice == "auto":
        return find_latest(ckpt_root)
    if not choice:
        raise CheckpointError("checkpoint.resume is empty: use auto, none or a checkpoint directory")
    p = Path(choice).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"checkpoint.resume={choice}: no such directory; give a step_NNNNNN checkpoint "
                              f"directory, or checkpoint.resume=auto (newest complete under {ckpt_root}) or none")
    if not _STEP_RE.match(p.name) and not (p / MARKER).exists():
        latest = find_latest(p)
        if latest is None:
            raise CheckpointError(f"checkpoint.resume={choice}: no complete step_NNNNNN checkpoint in it")
        return latest
    problem = check_complete(p)
    if problem is not None:
        raise CheckpointError(f"checkpoint.resume={choice}: not a complete checkpoint ({problem}); pick another, "
                              f"or checkpoint.resume=auto for the newest complete one")
    return p


# ---------------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Where the run is, saved as meta["train_state"]. step = completed steps (also the index of the next step)."""
    step: int = 0
    weight_version: int = 0
    data_position: dict = field(default_factory=dict)   # the sampler's own state: epoch, index, seed, ...
    run_id: Optional[str] = None                        # W&B run id, so a resumed run continues the same W&B run
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
    tokenizer, processor, chat template) from `source_dir`. Atomic like `save`: a tmp dir renamed into place."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    tensors = _detach_unshared(state_dict)
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
    old = out.with_name(f"{out.name}.tmp-old-{uuid.uuid4().hex[:12]}") if out.exists() else None
    if old is not None:
        os.rename(out, old)
    os.rename(tmp, out)
    _fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


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
