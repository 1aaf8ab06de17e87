"""Checkpoint integrity: per-file checksums in the manifest, verification split over ranks, non-finite tensors.

Who calls it: `megaapo/checkpoint.py`, which writes a checkpoint's COMPLETE manifest (every file with its size and
checksum), verifies a checkpoint before anything is loaded from it, and refuses to write non-finite state. Nothing
here knows how tensors are laid out in files: a checkpoint is a directory of files listed in its manifest, so the
same checks hold whatever writes the tensors (safetensors shards today, megatron-core's dist_checkpointing later).

Checksum: xxHash's XXH3-128 (`xxhash`), ~10x the speed of sha256 or blake2b in software, so reading the file back
costs about as much as the write's own page-cache copy and checksums can stay on by default (measured in
`docs/faults.md`). It detects corruption, not tampering. Manifests written before it carry `sha256`, still checked.

Verification of a checkpoint on several ranks: every rank checks the manifest and every file's size (cheap), and
hashes its share of the files (file i goes to rank i mod world); the ranks then agree on the first problem any of
them found, so all of them accept or refuse the same checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

MARKER = "COMPLETE"
CHECKSUM = "xxh3_128"
_CHUNK = 8 << 20
PathLike = Union[str, Path]


def _hasher(algo: str):
    if algo == CHECKSUM:
        import xxhash

        return xxhash.xxh3_128()
    return hashlib.new(algo)


def file_checksum(path: PathLike, algo: str = CHECKSUM) -> str:
    h = _hasher(algo)
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_info(path: PathLike, checksum: bool = True) -> dict:
    """A manifest entry: size, and the checksum of the bytes on disk (read back after the write's fsync)."""
    info: dict[str, Any] = {"size": Path(path).stat().st_size}
    if checksum:
        info[CHECKSUM] = file_checksum(path)
    return info


def read_manifest(path: PathLike) -> dict:
    return json.loads((Path(path) / MARKER).read_text())


def _recorded(info: dict) -> Optional[tuple[str, str]]:
    for algo in (CHECKSUM, "sha256"):
        if algo in info:
            return algo, info[algo]
    return None


def check_structure(path: PathLike) -> tuple[Optional[str], dict]:
    """(None, files) when `path` has a readable manifest and every file it lists with the recorded size, else
    (why not, {}). Reads no file contents."""
    path = Path(path)
    if not (path / MARKER).is_file():
        return f"no {MARKER} marker (a save that did not finish)", {}
    try:
        files = read_manifest(path)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MARKER} manifest ({e})", {}
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing", {}
        if f.stat().st_size != info.get("size"):
            return f"{name} has {f.stat().st_size} bytes, the manifest says {info.get('size')}", {}
    return None, files


def check_files(path: PathLike, files: dict, names) -> Optional[str]:
    """The first of `names` whose contents do not match its recorded checksum, as a reason; None if all match."""
    for name in names:
        rec = _recorded(files[name])
        if rec is not None and file_checksum(Path(path) / name, rec[0]) != rec[1]:
            return f"{name} fails its {rec[0]} checksum (its contents changed after it was written)"
    return None


def verify(path: PathLike, rank: int = 0, world_size: int = 1) -> Optional[str]:
    """None when `path` is a complete checkpoint whose files (this rank's share: index mod world_size) match their
    checksums, else why not. A manifest without checksums passes on sizes alone."""
    problem, files = check_structure(path)
    if problem is None:
        problem = check_files(path, files, [n for i, n in enumerate(sorted(files)) if i % world_size == rank])
    return problem


def verify_together(path: PathLike, group: Any = None) -> Optional[str]:
    """`verify` with the hashing split over the ranks of `group` (collective; None: this process alone). Every rank
    returns the same answer."""
    rank, world = _rank_world(group)
    return agree(verify(path, rank, world), group)


def _rank_world(group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def agree(problem: Optional[str], group: Any = None) -> Optional[str]:
    """The first non-None problem over the ranks of `group` (collective: the same answer on every rank), or `problem`
    alone without a group."""
    import torch.distributed as dist

    if group is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return problem
    found: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(found, problem, group=group)
    return next((p for p in found if p is not None), None)


# ---------------------------------------------------------------------------------------------------- non-finite
def tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) of every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}[{i}]")


def nonfinite(shards: dict) -> Optional[str]:
    """None when every floating tensor in `shards` (weights, optimizer state) is finite, else which are not.

    One fused norm per dtype and device over all tensors (NaN and inf propagate into a norm; one launch instead of a
    few hundred small ones), then the exact check only for a tensor whose norm is not finite (NaN/inf, or an
    overflow of finite values)."""
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, state in shards.items():
        for key, t in tensors(state):
            if t.is_floating_point() and t.numel():
                groups.setdefault((t.device, t.dtype), []).append((f"{name}:{key}", t))
    bad: list[str] = []
    for items in groups.values():
        norms = torch._foreach_norm([t for _, t in items])
        suspects = (~torch.isfinite(torch.stack(norms))).nonzero().flatten().tolist()
        bad += [items[i][0] for i in suspects if not bool(torch.isfinite(items[i][1]).all())]
    if not bad:
        return None
    return f"{len(bad)} tensor(s) hold NaN/inf values ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
