"""launch/slurm.sbatch on a real single-node SLURM cluster (Debian's slurm-wlm, started by tests/slurm/cluster.sh):
the demo config at 2 trainer processes (gloo, TP=2) plus the engine the trainer starts completes and logs its steps;
a job pre-empted the way SLURM warns before a time limit (USR1 to the batch shell) saves, requeues and resumes.

Needs root (slurmd runs jobs as the submitting user; the test cluster runs everything as root) and, unless slurm is
already installed, apt-get. CI runs as root; elsewhere the tests skip with that reason.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from test_train import SMALL

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
SBATCH = ROOT / "launch" / "slurm.sbatch"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow]


# ---------------------------------------------------------------------------------------------------- cluster
class Cluster:
    def __init__(self, conf: Path):
        self.conf = conf
        self.logs = conf.parent / "log"

    def env(self, **extra: str) -> dict:
        env = dict(os.environ)
        env.update(SLURM_CONF=str(self.conf), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHON=sys.executable,
                   NPROC_PER_NODE="2", RDZV_PORT=str(_free_port()))
        env.update(extra)
        return env

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, env=self.env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stdout}{res.stderr}")
        return res

    def sbatch(self, out: Path, *overrides: str) -> str:
        out.mkdir(parents=True, exist_ok=True)
        cmd = ["sbatch", "--parsable", "--job-name=megaapo-test", f"--output={out / 'job.out'}", str(SBATCH),
               "demo", *SMALL, "parallel.tp=2", f"trainer.output_dir={out / 'run'}", *overrides]
        res = subprocess.run(cmd, env=self.env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"sbatch failed: {res.stdout}{res.stderr}"
        return res.stdout.strip().split(";")[0]

    def job(self, jid: str) -> dict:
        """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge; there is no sacct here)."""
        res = self.run("scontrol", "show", "job", "-o", jid, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", res.stdout)) if res.returncode == 0 else {}

    def wait(self, jid: str, until, what: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(jid)
            if until(info):
                return info
            if info.get("JobState") in FINAL:
                raise AssertionError(f"job {jid} ended ({info.get('JobState')}, exit {info.get('ExitCode')}) "
                                     f"while waiting for: {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {jid}: no {what} within {timeout:.0f} s (state {info.get('JobState')}, "
                                     f"reason {info.get('Reason')})")
            time.sleep(0.5)

    def job_pids(self, jid: str) -> list[int]:
        """Every live process this job started (srun, torchrun, trainers, the vLLM engine, reward workers), found by
        the environment SLURM gives them: engines and torchrun's workers live in sessions of their own."""
        want = {f"SLURM_CONF={self.conf}".encode(), f"SLURM_JOB_ID={jid}".encode()}
        pids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid():
                continue
            try:
                env = set((p / "environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if want <= env:
                pids.append(int(p.name))
        return pids

    def assert_no_leftovers(self, jid: str, grace: float = 30.0) -> None:
        deadline = time.monotonic() + grace
        while (pids := self.job_pids(jid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        if pids:
            cmds = [_cmdline(p) for p in pids]
            _kill(pids)
            raise AssertionError(f"job {jid} left processes behind after {grace:.0f} s: {cmds}")

    def cleanup(self, jid: str) -> None:
        """Cancel the job if it is still queued or running and kill whatever it left."""
        if self.job(jid).get("JobState") not in FINAL:
            self.run("scancel", jid, check=False)
            try:
                self.wait(jid, lambda i: i.get("JobState") in FINAL, "end after scancel", 60)
            except AssertionError:
                pass
        _kill(self.job_pids(jid))

    def report(self, jid: str | None, out: Path) -> str:
        parts = []
        if jid:
            parts.append(f"--- scontrol show job {jid}\n{self.run('scontrol', 'show', 'job', jid, check=False).stdout}")
        for path, n in [(out / "job.out", 150), *[(p, 40) for p in sorted((out / "run" / "engines").glob("*.log"))],
                        (self.logs / "slurmctld.log", 40), (self.logs / "slurmd.log", 40)]:
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()
                parts.append(f"--- {path} (last {n} of {len(lines)} lines)\n" + "\n".join(lines[-n:]))
        ckpts = out / "run" / "checkpoints"
        if ckpts.exists():
            parts.append(f"--- {ckpts}: {sorted(p.name for p in ckpts.iterdir())}")
        return "\n".join(parts)

    @contextmanager
    def diagnosed(self, out: Path):
        """Yields a dict for the test to put its job id in; on failure prints the job's output and the daemons'
        logs (pytest shows them with the failure), and always leaves no job or process behind."""
        box: dict = {"jid": None}
        try:
            yield box
        except BaseException:
            print(self.report(box["jid"], out))
            raise
        finally:
            if box["jid"]:
                self.cleanup(box["jid"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the SLURM tests need root: the test cluster's daemons run as root and install slurm with apt-get")
    d = tmp_path_factory.mktemp("slurm")
    res = subprocess.run(["bash", str(CLUSTER), "start", str(d)], capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "stop", str(d / "slurm.conf")], capture_output=True, timeout=120)
        pytest.fail(f"could not start the test SLURM cluster:\n{res.stdout}{res.stderr}", pytrace=False)
    conf = Path(res.stdout.strip().splitlines()[-1])
    yield Cluster(conf)
    stop = subprocess.run(["bash", str(CLUSTER), "stop", str(conf)], capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, f"stopping the test cluster: {stop.stdout}{stop.stderr}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmdline(pid: int) -> str:
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return f"{pid}: (gone)"


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _saved_steps(out: Path) -> list[int]:
    """Steps of the complete checkpoints (a `step_N` directory appears by rename only once complete; older ones are
    pruned as newer ones land, so look for any, not one in particular)."""
    root = out / "run" / "checkpoints"
    return [int(p.name[5:]) for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name)] if root.exists() else []


def _steps(out: Path) -> list[int]:
    path = out / "run" / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ------------------------------------------------------------------------------------------------------ tests
@pytest.mark.timeout(900)
def test_sbatch_runs_the_demo_at_two_trainer_processes(cluster, tmp_path):
    out = tmp_path / "job"
    with cluster.diagnosed(out) as box:
        jid = box["jid"] = cluster.sbatch(out, "trainer.total_steps=4")
        info = cluster.wait(jid, lambda i: i.get("JobState") in FINAL, "end", timeout=600)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
        text = (out / "job.out").read_text()
        assert f"megaapo: job {jid} restart 0" in text
        steps = _steps(out)
        assert steps == sorted(set(steps)) and steps[-4:] == [1, 2, 3, 4], steps
        # Both TP ranks wrote their shards of the final checkpoint: the job really ran 2 trainer processes.
        final = out / "run" / "checkpoints" / "step_000004"
        assert json.loads((final / "COMPLETE").read_text())["layout"] == {"tp": 2, "pp": 1, "dp": 1, "world": 2}
        assert (final / "dist" / "__0_0.distcp").exists() and (final / "dist" / "__1_0.distcp").exists()
        cluster.assert_no_leftovers(jid)


@pytest.mark.timeout(1200)
def test_preempted_job_saves_requeues_and_resumes(cluster, tmp_path):
    total = 40   # ~35 steps of margin after the checkpoint the signal waits for: the run must not end first
    out = tmp_path / "job"
    with cluster.diagnosed(out) as box:
        jid = box["jid"] = cluster.sbatch(out, f"trainer.total_steps={total}", "checkpoint.every=2")
        cluster.wait(jid, lambda i: i.get("JobState") == "RUNNING" and max(_saved_steps(out), default=0) >= 4,
                     "a checkpoint at step 4 or later", timeout=600)
        # What SLURM does --signal=B:USR1@180 before the time limit, now: the script's trap saves and requeues.
        cluster.run("scancel", "--batch", "--signal=USR1", jid)
        cluster.wait(jid, lambda i: i.get("JobState") == "PENDING" and int(i.get("Restarts", 0)) >= 1,
                     "requeue after USR1", timeout=300)
        # Requeued: nothing of the first run may be left (torchrun's workers and the engine have their own sessions,
        # so a trainer whose torchrun was SIGKILLed would train on). The script requeues only after srun returned.
        cluster.assert_no_leftovers(jid, grace=10)
        # SLURM holds a requeued job ~120 s; release it, >= 2 s after the requeue (sooner, slurmctld may revoke the
        # job's credential and fail it for good).
        time.sleep(3)
        cluster.run("scontrol", "update", f"JobId={jid}", "StartTime=now")
        info = cluster.wait(jid, lambda i: i.get("JobState") in FINAL, "end of the resumed run", timeout=600)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
        assert info["Restarts"] == "1", info

        text = (out / "job.out").read_text()   # --open-mode=append: both runs' output
        assert f"megaapo: job {jid} restart 0" in text and f"megaapo: job {jid} restart 1" in text
        assert "got USR1: saving a checkpoint and requeueing" in text
        saved = re.findall(r"stop signal: saved step (\d+), exiting for requeue", text)
        assert saved, "the trainers did not save on the forwarded TERM"
        k = int(saved[0])
        assert 4 <= k < total
        assert f"resumed from {out / 'run' / 'checkpoints' / f'step_{k:06d}'} (step {k}," in text
        steps = _steps(out)
        # No step lost or logged twice across the restart (the first run's rows after step k are replaced).
        assert steps == sorted(set(steps)) and steps[-total:] == list(range(1, total + 1)), steps
        assert (out / "run" / "checkpoints" / f"step_{total:06d}").is_dir()
        cluster.assert_no_leftovers(jid)
