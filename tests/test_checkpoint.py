"""megaapo.checkpoint: exact round trips, torn checkpoints never found, keep_last, 2-rank gloo saves, signals."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megaapo import checkpoint as ckpt
from megaapo.config import CheckpointConfig

REPO = Path(__file__).resolve().parent.parent


def _meta(step):
    return {"train_state": ckpt.TrainState(step=step, weight_version=step, data_position={"epoch": 0, "index": step},
                                           run_id="abc123").to_dict()}


def _tiny_save(root, step, keep_last=10, value=0.0):
    return ckpt.save(root, step, {"model": {"w": torch.full((3,), float(value))}}, _meta(step), keep_last)


def _draws():
    return (random.random(), float(np.random.rand()), torch.rand(3))


def test_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11, bias=False))
    net[1].weight = net[0].weight   # tied: shares storage, which safetensors refuses unless we copy
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    weights = {k: v for k, v in net.state_dict().items()}
    weights["bf16_view"] = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)[:, 1:]   # non-contiguous
    rng = ckpt.capture_rng()
    expected = _draws()

    path = ckpt.save(tmp_path, 7, {"model": weights, "optim": opt.state_dict(), "rng": rng}, _meta(7), 2,
                     checksum=True)
    assert path.name == "step_000007" and ckpt.find_latest(tmp_path) == path
    _draws()                            # move every generator on
    loaded = ckpt.load(path, rank=0)
    assert loaded.step == 7 and ckpt.TrainState.from_dict(loaded.meta["train_state"]).data_position["index"] == 7
    assert set(loaded.shards) == {"model", "optim", "rng"}
    for k, v in weights.items():
        assert loaded.shards["model"][k].dtype == v.dtype and torch.equal(loaded.shards["model"][k], v), k
    ckpt.restore_rng(loaded.shards["rng"])
    got = _draws()
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])

    # the optimizer continues bit-identically from the loaded state
    net2 = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11, bias=False))
    net2[1].weight = net2[0].weight
    net2.load_state_dict({k: v for k, v in loaded.shards["model"].items() if k != "bf16_view"})
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-2)
    opt2.load_state_dict(loaded.shards["optim"])
    for n, o in ((net, opt), (net2, opt2)):
        o.zero_grad()
        n(torch.tensor([4, 5])).sum().backward()
        o.step()
    assert torch.equal(net[0].weight, net2[0].weight)


def test_torn_checkpoints_are_never_found(tmp_path):
    good = _tiny_save(tmp_path, 2)
    _tiny_save(tmp_path, 1)
    no_marker = tmp_path / "step_000003"
    shutil.copytree(good, no_marker)
    (no_marker / ckpt.MARKER).unlink()
    truncated = tmp_path / "step_000004"
    shutil.copytree(good, truncated)
    shard = truncated / "model.rank0.safetensors"
    shard.write_bytes(shard.read_bytes()[:-5])
    missing = tmp_path / "step_000005"
    shutil.copytree(good, missing)
    (missing / ckpt.META).unlink()
    garbage = tmp_path / "step_000006"
    shutil.copytree(good, garbage)
    (garbage / ckpt.MARKER).write_text("{not json")
    shutil.copytree(good, tmp_path / "step_000009.tmp-deadbeef")   # complete-looking, but a tmp name

    assert ckpt.find_latest(tmp_path) == good
    for bad in (no_marker, truncated, missing, garbage):
        with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
            ckpt.load(bad)
        with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
            ckpt.resolve_resume(CheckpointConfig(resume=str(bad)), tmp_path)
    # a flipped byte keeps the size: only a recorded checksum catches it, and load checks it
    summed = ckpt.save(tmp_path / "sums", 1, {"model": {"w": torch.ones(4)}}, _meta(1), 2, checksum=True)
    f = summed / "model.rank0.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.load(summed)


_KILL_CHILD = """
import sys, torch
from megaapo import checkpoint as ckpt
root = sys.argv[1]
ckpt.save(root, 1, {"model": {"w": torch.ones(3)}}, {"train_state": {"step": 1}}, 5)
print("saved 1", flush=True)
ckpt.save(root, 2, {"model": {"big": torch.zeros(64 * 1024 * 1024)}}, {"train_state": {"step": 2}}, 5)
print("saved 2", flush=True)
"""


def test_sigkill_mid_write_leaves_previous_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "saved 1"
        deadline = time.time() + 60
        while time.time() < deadline:
            # safetensors writes into a hidden temp file it renames at the end; either name means mid-write
            writing = [e for d in tmp_path.glob("step_000002.tmp-*") for e in d.iterdir() if e.name != "_parts"]
            if writing:
                break
            assert proc.poll() is None, "the child finished before it could be caught mid-write"
            time.sleep(0.0005)
        # stop it first so the state we check is the state it is killed in
        proc.send_signal(signal.SIGSTOP)
        tmp_dir = writing[0].parent
        assert not (tmp_dir / ckpt.MARKER).exists() and not (tmp_path / "step_000002").exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "step_000002").exists() and list(tmp_path.glob("step_000002.tmp-*"))
    assert ckpt.find_latest(tmp_path) == tmp_path / "step_000001"
    assert ckpt.load(ckpt.find_latest(tmp_path)).meta == {"train_state": {"step": 1}}
    _tiny_save(tmp_path, 3)             # the next save clears the torn tmp dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001", "step_000003"]


def test_keep_last_and_resave(tmp_path):
    for step in range(1, 6):
        _tiny_save(tmp_path, step, keep_last=2, value=step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000004", "step_000005"]
    _tiny_save(tmp_path, 5, keep_last=2, value=50)   # saved twice at one step: the newer wins, nothing is torn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000004", "step_000005"]
    assert ckpt.load(tmp_path / "step_000005").shards["model"]["w"][0].item() == 50


def test_resolve_resume(tmp_path):
    root = tmp_path / "ckpts"
    assert ckpt.resolve_resume(CheckpointConfig(resume="auto"), root) is None
    assert ckpt.resolve_resume(CheckpointConfig(resume="none"), root) is None
    latest = _tiny_save(root, 4)
    assert ckpt.resolve_resume(CheckpointConfig(resume="auto"), root) == latest
    assert ckpt.resolve_resume(CheckpointConfig(resume="none"), root) is None
    assert ckpt.resolve_resume(CheckpointConfig(resume=str(latest)), tmp_path / "elsewhere") == latest
    assert ckpt.resolve_resume(CheckpointConfig(resume=str(root)), tmp_path / "elsewhere") == latest
    with pytest.raises(ckpt.CheckpointError, match="no such directory.*checkpoint.resume=auto"):
        ckpt.resolve_resume(CheckpointConfig(resume=str(tmp_path / "nope")), root)
    with pytest.raises(ckpt.CheckpointError, match="written by 1 trainer ranks"):
        ckpt.load(latest, rank=1)
    assert ckpt.checkpoint_root(CheckpointConfig(), "runs/x") == Path("runs/x/checkpoints")


def _gloo_worker(rank, world, init_file, root):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        for step in (1, 2):   # the loss-visible rank (here the last) owns meta
            ckpt.save(root, step, {"model": {"w": torch.full((2,), 10.0 * step + rank)}, "rng": ckpt.capture_rng()},
                      _meta(step) if rank == world - 1 else None, keep_last=1, group=group)
        got = ckpt.load(Path(root) / "step_000002", rank=rank)
        assert got.shards["model"]["w"].tolist() == [20.0 + rank] * 2 and got.meta == _meta(2)
        # a plain barrier callable instead of a group: the tmp dir is found on disk
        ckpt.save(root, 3, {"model": {"w": torch.full((2,), 30.0 + rank)}}, _meta(3) if rank == 0 else None, 1,
                  rank=rank, world_size=world, barrier=dist.barrier)
        assert ckpt.load(Path(root) / "step_000003", rank=rank).shards["model"]["w"][0].item() == 30.0 + rank
        flag = ckpt.StopFlag()
        if rank == 1:
            flag._handle(signal.SIGTERM, None)
        assert flag.any_rank() is True
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_rank_gloo_save(tmp_path):
    import torch.multiprocessing as mp

    root = tmp_path / "ckpts"
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), str(root)), nprocs=2, join=True)
    assert [p.name for p in root.iterdir()] == ["step_000003"]
    manifest = ckpt.read_manifest(root / "step_000003")
    assert manifest["world_size"] == 2
    assert sorted(manifest["files"]) == ["meta.json", "model.rank0.safetensors", "model.rank1.safetensors"]


def test_stop_flag_from_a_real_signal():
    before = signal.getsignal(signal.SIGTERM)
    flag = ckpt.install_stop_handler()
    try:
        assert not flag
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not flag and time.time() < deadline:   # Python runs the handler between bytecodes
            time.sleep(0.001)
        assert flag and flag.name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert flag.name == "SIGUSR1" and flag.count == 2
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGTERM) == before


_LOOP_CHILD = """
import sys, time, torch
from megaapo import checkpoint as ckpt
root = sys.argv[1]
stop = ckpt.install_stop_handler()
for step in range(1, 10_000):
    time.sleep(0.02)                       # one training step
    if step == 3:
        print("running", flush=True)
    if stop:                               # the safe point: between steps
        ckpt.save(root, step, {"model": {"w": torch.full((2,), float(step))}},
                  {"train_state": {"step": step}, "signal": stop.name}, 2)
        print("saved", step, flush=True)
        sys.exit(0)
sys.exit(3)
"""


def test_sigterm_saves_at_next_safe_point_and_exits(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _LOOP_CHILD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    step = int(out.split()[-1])
    latest = ckpt.find_latest(tmp_path)
    assert latest == tmp_path / ckpt.step_dir_name(step)
    assert json.loads((latest / ckpt.META).read_text())["signal"] == "SIGTERM"


def test_export_hf_shards_and_copies_configs(tmp_path):
    from safetensors import safe_open

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    (src / "tokenizer.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"old weights, not copied")
    sd = {f"model.layers.{i}.mlp.weight": torch.randn(64, 64) for i in range(4)} | {"lm_head.weight": torch.ones(8)}
    out = ckpt.export_hf(sd, tmp_path / "hf", source_dir=src, max_shard_bytes=2 * 64 * 64 * 4)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(sd) and len(set(index["weight_map"].values())) == 3
    for k, v in sd.items():
        with safe_open(out / index["weight_map"][k], "pt") as f:
            assert f.metadata() == {"format": "pt"} and torch.equal(f.get_tensor(k), v)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("model")) == ["config.json", "tokenizer.json"]
    again = ckpt.export_hf({"w": torch.zeros(2)}, tmp_path / "hf")   # replaces the old export whole
    assert sorted(p.name for p in again.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "src"]


# ------------------------------------------------------------------------------------------------ integrity (faults)
def _overwrite_in_place(path, offset=4096, n=16 * 1024):
    """Corrupt a file the way a bad disk or a stray writer does: bytes changed, size unchanged."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes((b + 1) % 256 for b in f.read(n)))   # every byte differs
    assert path.stat().st_size == size


def _big_save(root, step, value=1.0, keep_last=10):
    return ckpt.save(root, step, {"model": {"w": torch.full((64 * 1024,), value)}}, _meta(step), keep_last)


def test_checkpoint_corrupted_in_place_is_refused(tmp_path, caplog):
    """Checksums are on by default: 16 KiB overwritten in the newest checkpoint (same size) makes resume take the
    previous one, with a warning naming the file; when none is usable, resume=auto refuses to start and lists each
    with its reason, and only an explicit fresh start (resume=none) goes on."""
    first, second = _big_save(tmp_path, 1), _big_save(tmp_path, 2, 2.0)
    assert all("xxh3_128" in info for info in ckpt.read_manifest(second)["files"].values())
    _overwrite_in_place(second / "model.rank0.safetensors")
    auto = CheckpointConfig(resume="auto")
    with caplog.at_level("WARNING"):
        assert ckpt.resolve_resume(auto, tmp_path) == first
    assert "step_000002: model.rank0.safetensors fails its xxh3_128 checksum" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="step_000002.*fails its xxh3_128 checksum"):
        ckpt.load(second)
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint.*checksum"):
        ckpt.resolve_resume(CheckpointConfig(resume=str(second)), tmp_path)

    _overwrite_in_place(first / "meta.json", offset=0, n=8)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.resolve_resume(auto, tmp_path)
    msg = str(err.value)
    assert "none of the 2 checkpoint(s)" in msg and "checkpoint.resume=none" in msg
    assert "step_000002: model.rank0.safetensors fails" in msg and "step_000001: meta.json fails" in msg
    assert ckpt.resolve_resume(CheckpointConfig(resume="none"), tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001", "step_000002"]   # nothing touched


def test_nonfinite_state_is_never_saved(tmp_path):
    good = _big_save(tmp_path, 1)
    for bad in (float("nan"), float("inf")):
        state = {"model": {"w": torch.ones(8)}, "optim": {"state": {0: {"exp_avg": torch.tensor([0.0, bad])}}}}
        with pytest.raises(ckpt.CheckpointError, match=r"step_000002 not saved \(the newest complete one, "
                                                       r"step_000001, is untouched\).*optim:state.0.exp_avg"):
            ckpt.save(tmp_path, 2, state, _meta(2), keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"] and ckpt.find_latest(tmp_path) == good


def test_prune_never_removes_the_checkpoint_just_written(tmp_path):
    """Resuming from step 2 after steps 3 and 4 were refused (or belong to an abandoned run): keep_last counts by
    step number, yet the newly saved, verified step 3 must survive it."""
    for step in (2, 4, 5):
        _big_save(tmp_path, step)
    assert ckpt.prune(tmp_path, 1, protect=tmp_path / "step_000002") == [tmp_path / "step_000004"]
    _big_save(tmp_path, 3, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000005"]


def test_full_disk_during_save_is_one_error_and_removes_the_partial_directory(tmp_path):
    """A real write error from the kernel at the write call, in-process without privileges: a file-size limit
    (RLIMIT_FSIZE, SIGXFSZ ignored) makes write() fail with EFBIG inside safetensors' and torch's own writers. The
    previous checkpoint stays, no tmp dir is left, the error names the file and the cause. (The disk-full run in
    tests/test_faults.py uses a real small filesystem.)"""
    import errno
    import resource

    from megaapo.rundir import WriteError

    first = _big_save(tmp_path, 1)
    big = {"model": {"w": torch.ones(64 * 1024)}, "optim": {"state": {"m": torch.zeros(512 * 1024)}}}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(WriteError) as err:
            ckpt.save(tmp_path, 2, big, _meta(2), keep_last=1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    e = err.value
    assert e.errno == errno.EFBIG and e.filename.endswith("optim.rank0.pt")
    assert str(e).startswith("checkpoint step_000002 not saved (the newest complete one, step_000001, is untouched)")
    assert "File too large" in str(e) and "\n" not in str(e)
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"] and ckpt.find_latest(tmp_path) == first


def _gloo_fault_worker(rank, world, init_file, root):
    """Faults on one rank only: both ranks must raise (nobody waits forever at a barrier) and nothing is written."""
    import resource

    import torch.distributed as dist

    from megaapo.rundir import WriteError

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        ckpt.save(root, 1, {"model": {"w": torch.ones(4) * rank}}, _meta(1) if rank == 0 else None, 1, group=group)
        nan = {"model": {"w": torch.tensor([float("nan") if rank == 1 else 0.0])}}
        with pytest.raises(ckpt.CheckpointError, match="NaN/inf"):
            ckpt.save(root, 2, nan, _meta(2) if rank == 0 else None, 1, group=group)
        if rank == 1:   # rank 1's disk is "full" (a file-size limit): its write fails, rank 0's succeeds
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        big = {"model": {"w": torch.ones(64 * 1024)}}
        with pytest.raises(WriteError if rank == 1 else ckpt.CheckpointError, match="step_000002 not saved"):
            ckpt.save(root, 2, big, _meta(2) if rank == 0 else None, 1, group=group)
        dist.barrier()
        assert sorted(p.name for p in Path(root).iterdir()) == ["step_000001"]
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_rank_save_faults_on_one_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gloo_fault_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ckpts")), nprocs=2, join=True)
