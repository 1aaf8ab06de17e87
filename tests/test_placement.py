"""GPU placement of trainer ranks and rollout engines (`megaapo.rollout.placement`), the engine processes' device
environment, the refusals that come before anything starts, and the sync benchmark's one device per rank.

The planner is pure and tested on lists of GPU ids; the client test starts real engine server processes and reads
the environment they were given (they are stopped before they finish loading vLLM); no GPU is needed anywhere."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megaapo.config import ConfigError, RolloutConfig, load_config
from megaapo.rollout.placement import Placement, plan, plan_here, visible_gpus

ROOT = Path(__file__).resolve().parents[1]
GPUS8 = [str(i) for i in range(8)]


def _r(**kw) -> RolloutConfig:
    return RolloutConfig(**kw)


# ------------------------------------------------------------------------------------------------------ the plan
@pytest.mark.parametrize("gpus, trainers, rollout, trainer_gpus, engines", [
    # 8 GPUs, 4 trainers: two TP=2 engines on the four after them, in order
    (GPUS8, 4, _r(num_engines=2, tensor_parallel_size=2), GPUS8[:4], (("4", "5"), ("6", "7"))),
    # the node's own names (CUDA_VISIBLE_DEVICES entries) are passed on as written
    (["4", "5", "GPU-ab12", "7"], 2, _r(num_engines=2), ["4", "5"], (("GPU-ab12",), ("7",))),
    # explicit engine GPUs, disjoint from the trainers'
    (GPUS8, 2, _r(num_engines=2, engine_gpus=[7, "5"]), ["0", "1"], (("7",), ("5",))),
    # remote engines are not placed by us, so every GPU can be a trainer's
    (GPUS8, 8, _r(addresses=["tcp://rollout-node:5555"]), GPUS8, None),
    # colocated: one trainer, the engine lives in it
    (["0"], 1, _r(mode="colocated"), ["0"], None),
    # CPU: nothing to place; engines run on CPU
    ([], 0, _r(num_engines=2), [], ((), ())),
])
def test_plan_gives_trainers_and_engines_disjoint_gpus(gpus, trainers, rollout, trainer_gpus, engines):
    p = plan(gpus=gpus, local_trainers=trainers, world_size=max(1, trainers), rollout=rollout)
    assert p.trainer_gpus == tuple(trainer_gpus) and p.engines == engines and not p.shared
    used = list(p.trainer_gpus) + [g for e in (p.engines or ()) for g in e]
    assert len(used) == len(set(used))
    for i, devices in enumerate(engines or ()):
        assert p.engine_env(i) == ({"CUDA_VISIBLE_DEVICES": ",".join(devices)} if devices else {})


@pytest.mark.parametrize("gpus, trainers, world, rollout, message", [
    # two ranks of the trainer's NCCL group on one GPU
    (["0", "1"], 4, 4, _r(addresses=["tcp://x:1"]), r"4 trainer processes on this node but only 2 GPU\(s\)"),
    # no GPU left for the engine: it would share trainer rank 0's GPU inside the weight-sync group
    (["0"], 1, 1, _r(), r"need 1 GPU\(s\) of their own.*rollout.mode=colocated"),
    (GPUS8, 8, 8, _r(), r"Start fewer trainer processes \(NPROC_PER_NODE\).*rollout.addresses"),
    (GPUS8, 4, 4, _r(engine_gpus=["3"]), r"GPU 3 is a trainer rank's"),
    (GPUS8, 4, 4, _r(engine_gpus=["9"]), r"9 not among this node's GPUs"),
    (GPUS8, 4, 4, _r(num_engines=2, engine_gpus=["5", "5"]), r"lists GPU 5 more than once"),
    (GPUS8, 4, 4, _r(tensor_parallel_size=2, engine_gpus=["5"]), r"need exactly 2"),
    ([], 0, 1, _r(engine_gpus=["1"]), r"no GPU visible"),
    # colocated with several trainer processes: vLLM's world-group set-up would wait for the other ranks
    (GPUS8, 2, 2, _r(mode="colocated"), r"colocated with 2 trainer processes.*external launcher"),
])
def test_layouts_that_cannot_work_are_refused_with_the_fix(gpus, trainers, world, rollout, message):
    with pytest.raises(ConfigError, match=message):
        plan(gpus=gpus, local_trainers=trainers, world_size=world, rollout=rollout)


def test_multi_node_and_callers_without_weight_sync():
    # A node other than rank 0's starts no engines, so all its GPUs may hold trainers.
    other = plan(gpus=GPUS8, local_trainers=8, world_size=16, rollout=_r(), starts_engines=False)
    assert other.engines is None and len(other.trainer_gpus) == 8
    # Eval on one GPU: no sync group, so the engine may share it (flagged, and weight updates are then refused).
    ev = plan(gpus=["0"], local_trainers=1, world_size=1, rollout=_r(), weight_sync=False)
    assert ev.engines == (("0",),) and ev.shared
    # A free GPU is still preferred.
    assert plan(gpus=["0", "1"], local_trainers=1, world_size=1, rollout=_r(), weight_sync=False).engines == (("1",),)


def test_plan_from_the_launchers_environment():
    torchrun_node0 = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "0", "RANK": "2",
                      "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5"}
    p = plan_here(_r(num_engines=2), trainer_on_gpu=True, env=torchrun_node0, device_count=6)
    assert p.trainer_gpus == ("0", "1", "2", "3") and p.engines == (("4",), ("5",))
    node1 = dict(torchrun_node0, GROUP_RANK="1", RANK="6")
    assert plan_here(_r(num_engines=2), trainer_on_gpu=True, env=node1, device_count=6).engines is None
    single = plan_here(_r(), trainer_on_gpu=True, env={}, device_count=2)
    assert single.trainer_gpus == ("0",) and single.engines == (("1",),)
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-a, GPU-b"}, 2) == ["GPU-a", "GPU-b"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3"}, 0) == []
    assert "engine 0 on GPUs 4" in p.describe()


# ------------------------------------------------------------------------------------------ engine processes
def _environ(pid: int) -> dict:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)


def test_engines_started_by_the_client_do_not_inherit_the_trainers_gpu(monkeypatch, tmp_path):
    """A trainer on the first of three GPUs (CUDA_VISIBLE_DEVICES=3,5,6) starts two engines: each process gets a
    GPU of its own, not the inherited list (vLLM would take its first entry, the trainer's GPU). GPUs are faked for
    the client's planner; the engine servers are real processes, stopped while they still load."""
    from megaapo.rollout import RolloutClient

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    client = RolloutClient(_r(num_engines=2, start_timeout_s=60.0), tmp_path / "unused_model", "float32",
                           log_dir=tmp_path, wait=False)
    try:
        got = [_environ(h.proc.pid).get("CUDA_VISIBLE_DEVICES") for h in client.engines]
    finally:
        client.shutdown()
    assert got == ["5", "6"]
    assert client.placement.trainer_gpus == ("3",)


def test_weight_update_refused_when_an_engine_shares_the_trainers_gpu():
    """An eval-style placement (engine on the trainer's GPU) must not reach NCCL's "Duplicate GPU detected"."""
    from megaapo.rollout import EngineError, RolloutClient

    client = RolloutClient.__new__(RolloutClient)   # only the check before the transfer forms: no engine needed
    client.placement = Placement(("0",), (("0",),), shared=True)
    with pytest.raises(EngineError, match="share a GPU with the trainer.*rollout.mode=colocated"):
        client._trainer_init_info()


# --------------------------------------------------------------------------------------- refused at the start
def test_colocated_config_refuses_what_one_process_cannot_hold():
    for bad, what in ((["parallel.tp=2"], "parallel.tp=2"), (["rollout.num_engines=2"], "num_engines=2"),
                      (["rollout.addresses=[tcp://x:1]"], "rollout.addresses"), (["trainer.device=cpu"], "GPUs")):
        with pytest.raises(ConfigError, match=what):
            load_config("demo", ["rollout.mode=colocated", "rollout.max_staleness=0", "trainer.device=auto", *bad])
    load_config("demo", ["rollout.mode=colocated", "rollout.max_staleness=0", "trainer.device=auto"])   # fine


def test_colocated_under_torchrun_with_two_ranks_is_one_line_not_a_hang(tmp_path):
    """Before any process group exists: rank 0 of a 2-process torchrun would otherwise wait for the world (and,
    with vLLM built on rank 0 alone, hang in vLLM's world-group set-up)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="9", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "megaapo.train", "demo", "rollout.mode=colocated",
                          "rollout.max_staleness=0", "trainer.device=auto", f"trainer.output_dir={tmp_path}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rollout.mode=colocated with 2 trainer processes") and "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 60


# ------------------------------------------------------------------------------------------ sync benchmark
def test_sync_benchmark_uses_one_device_per_rank():
    spec = importlib.util.spec_from_file_location("bench_sync", ROOT / "benchmarks" / "sync.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert [bench.rank_device(r, 2) for r in (0, 1)] == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert bench.rank_device(1, 0) == torch.device("cpu")
    with pytest.raises(SystemExit, match="needs two GPUs"):
        bench.rank_device(0, 1)
