"""The run directory: one writer at a time, failed writes as one line, and earlier runs' history kept.

Who calls it: `megaapo/cli.py` (train, sft) takes the lock before it writes anything (config, tiny model, synthetic
data); `megaapo/run.py` takes it again (a no-op in the same process) for torchrun launches, which skip the CLI, and for
a checkpoint root outside the run directory, and calls `archive_history` before a fresh start. `megaapo/checkpoint.py`
and `megaapo/metrics.py` turn a failed write into a `WriteError` naming the path and the cause.

Lock: `<dir>/.megaapo.lock` holds the holder's host, pid, start time and command (JSON) and is `flock`ed for the
holder's lifetime. The kernel drops an flock when its process dies, however it dies, so the lock of a killed run is
stale by construction: the next run takes it over and says whose it was. A second run finds the flock held and
fails at once naming the holder. A releasing holder unlinks the file while it still holds the flock, and a taker
checks that the file it locked is still the one at the path, so two processes can never both believe they hold it.
Across hosts this relies on the filesystem's flock (NFSv4, Lustre with `flock`); where flock is not supported the
file's host and pid still let a run on the same host tell a live holder from a dead one.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

log = logging.getLogger(__name__)

LOCK_NAME = ".megaapo.lock"
PathLike = Union[str, Path]


class RunDirError(RuntimeError):
    """The run directory cannot be used (another run holds it); the message names the holder and the fix."""


# ---------------------------------------------------------------------------------------------------- write errors
_HINTS = {
    errno.ENOSPC: "the filesystem is full: free space there, or point trainer.output_dir / checkpoint.dir elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space there, or point trainer.output_dir / checkpoint.dir elsewhere",
    errno.EROFS: "the filesystem is read-only: choose a writable trainer.output_dir / checkpoint.dir",
    errno.EACCES: "no permission to write there: choose another trainer.output_dir / checkpoint.dir or fix its "
                  "permissions",
    errno.EPERM: "no permission to write there: choose another trainer.output_dir / checkpoint.dir or fix its "
                 "permissions",
    errno.EFBIG: "the file size limit (ulimit -f) is reached",
    errno.EIO: "the storage device reported an I/O error",
}
WRITE_ERRNOS = frozenset(_HINTS)


class WriteError(OSError):
    """Writing a run's file failed (disk full, read-only filesystem, no permission, quota): `str()` is one line
    naming the path, the cause and what to do."""

    def __init__(self, code: int, path: PathLike, what: str = ""):
        super().__init__(code, os.strerror(code), str(path))
        self.what = what

    def __str__(self) -> str:
        head = f"{self.what}: " if self.what else ""
        hint = _HINTS.get(self.errno)
        return f"{head}cannot write {self.filename}: {self.strerror}" + (f" ({hint})" if hint else "")


def write_errno(exc: BaseException, path: Optional[PathLike] = None) -> Optional[int]:
    """The errno behind a failed write, or None when it was not the filesystem. Libraries wrap the OSError (torch's
    zip writer raises a RuntimeError from it, safetensors' Rust writer says "os error 28" in its message); when the
    cause is hidden altogether and `path` is given (only where the failing call was the write itself), a full or
    read-only filesystem under `path` is recognised by asking it."""
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return e.errno
        m = re.search(r"os error (\d+)", str(e))
        if m and int(m.group(1)) in WRITE_ERRNOS:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    if path is not None:
        return _probe(Path(path))
    return None


def _probe(path: Path) -> Optional[int]:
    """ENOSPC/EROFS when the filesystem holding `path` is full or mounted read-only, else None."""
    d = path if path.is_dir() else path.parent
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        st = os.statvfs(d)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail * st.f_frsize < (1 << 20):
        return errno.ENOSPC
    return None


def as_write_error(exc: BaseException, path: PathLike, what: str = "", probe: bool = False) -> Optional[WriteError]:
    """`exc` (raised while writing `path`) as a WriteError naming the file the OSError names, else `path`; None when
    it is not a filesystem failure. probe: also ask the filesystem (see `write_errno`)."""
    if isinstance(exc, WriteError):
        return exc
    code = write_errno(exc, path if probe else None)
    return WriteError(code, getattr(exc, "filename", None) or path, what) if code is not None else None


@contextmanager
def writing(path: PathLike, what: str = "", probe: bool = False) -> Iterator[None]:
    """Turn a filesystem failure inside the block into a `WriteError` naming `path` (or the file the OSError names).
    probe=True only around a bare write call: any failure there on a full or read-only filesystem is that."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:  # noqa: BLE001 -- re-raised unchanged unless it is a write failure
        err = as_write_error(e, path, what, probe)
        if err is None:
            raise
        raise err from e


def write_text(path: PathLike, text: str) -> None:
    """Write a small text file through a temporary name (a failed write leaves the old file, and no temporary)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def make_dir(path: PathLike, what: str = "") -> Path:
    path = Path(path)
    with writing(path, what):
        path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------- the lock
_HELD: dict[str, "RunLock"] = {}


class RunLock:
    """An flock on `<dir>/.megaapo.lock` with the holder's identity in the file; see the module docstring."""

    def __init__(self, directory: Path, fd: int, previous: Optional[dict]):
        self.directory, self.path, self.fd, self.previous = directory, directory / LOCK_NAME, fd, previous
        self.count, self.pid = 1, os.getpid()

    def release(self) -> None:
        self.count -= 1
        if self.count > 0 or self.fd < 0 or os.getpid() != self.pid:   # a forked child never releases it
            return
        _HELD.pop(str(self.directory), None)
        try:
            self.path.unlink()   # while still holding the flock: see the module docstring
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def _identity() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}


def _read_holder(fd: int) -> Optional[dict]:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None


def _alive_here(holder: dict) -> bool:
    """Whether the holder is a live process on this host (unknown hosts count as alive: we cannot ask them)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "another process"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}: "
            f"{holder.get('command', '?')})")


def acquire(directory: PathLike, what: str = "run directory") -> RunLock:
    """Take the lock of `directory` (made if missing) for this process; a second call in the same process is a
    no-op that returns the held lock. Raises RunDirError naming the holder when another live process holds it."""
    directory = make_dir(directory, f"the {what}")
    key = str(directory.resolve())
    if key in _HELD:
        _HELD[key].count += 1
        return _HELD[key]
    path = directory / LOCK_NAME
    while True:
        with writing(path, f"the {what}'s lock"):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        holder = _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(f"{what} {directory} is in use by {_describe(holder)}: wait for that run to end, or "
                              "choose another trainer.output_dir") from None
        except OSError as e:   # no flock on this filesystem: judge by the holder the file names
            if holder and _alive_here(holder) and holder.get("pid") != os.getpid():
                os.close(fd)
                raise RunDirError(f"{what} {directory} is in use by {_describe(holder)} (this filesystem has no "
                                  f"file locks: {e.strerror}; if that run is gone, delete {path})") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)   # the holder released (and unlinked) it between our open and our flock: try again
    holder = _read_holder(fd)
    if holder:
        log.warning("taking over the lock of %s from %s, which is no longer running", directory, _describe(holder))
    with writing(path, f"the {what}'s lock"):
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_identity()).encode(), 0)
        os.fsync(fd)
    lock = RunLock(directory.resolve(), fd, holder)
    if not _HELD:
        atexit.register(release_all)   # a clean exit leaves no lock file behind (a killed run's is stale anyway)
    _HELD[key] = lock
    return lock


def held(directory: PathLike) -> bool:
    """Whether this process holds the lock of `directory`."""
    return str(Path(directory).resolve()) in _HELD


def release_all() -> None:
    for lock in list(_HELD.values()):
        lock.count = 1
        lock.release()


# ---------------------------------------------------------------------------------------------------- history
def archive_history(run_dir: PathLike, checkpoints: list, metrics: bool) -> Optional[Path]:
    """Move what a restart must not destroy into `history/<time>/` folders, where no scan looks: the given
    checkpoint directories (into their root's `history/`) and, with `metrics`, the run's `metrics.jsonl` and plot
    (into the run directory's). `megaapo.run` calls it before a fresh start in a used directory (everything), and
    when a resume continues from an older checkpoint than the newest ones present (those newer ones: another
    timeline, or refused). Returns the run directory's history folder, or None when there was nothing to keep."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jsonl = run_dir / "metrics.jsonl"
    rows = metrics and jsonl.is_file() and jsonl.stat().st_size > 0
    if not rows and not checkpoints:
        return None
    dest = run_dir / "history" / stamp
    kept = []
    with writing(dest, "keeping an earlier run's history"):
        dest.mkdir(parents=True, exist_ok=True)
        if rows:
            for f in (jsonl, run_dir / "metrics.png"):
                if f.is_file():
                    os.replace(f, dest / f.name)
            kept.append(f"metrics in {dest}")
        for p in map(Path, checkpoints):
            cdest = p.parent / "history" / stamp
            cdest.mkdir(parents=True, exist_ok=True)
            os.replace(p, cdest / p.name)
            kept.append(f"{p.name} in {cdest}")
    log.warning("kept the earlier history of %s rather than overwrite it: %s", run_dir, ", ".join(kept))
    return dest
