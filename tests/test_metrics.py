"""megaapo.metrics: W&B offline runs read back with wandb's own reader, JSONL resume, plot, console, FLOPs/MFU."""

import io
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from rich.console import Console

from megaapo import metrics as M
from megaapo.config import LoggingConfig


def _quiet_console():
    buf = io.StringIO()
    return Console(file=buf, width=200, force_terminal=False), buf


def _rows(step):
    return {"reward/total": 0.25 * step, "train/accuracy": 0.1 * step, "kl": 1e-3 * step}


def _read_wandb_records(run_file):
    """Records of a .wandb transaction log, decoded by wandb's own reader (`wandb leet inspect`, in wandb-core)."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                         capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_wandb_offline_run_holds_the_logged_metrics(tmp_path):
    cfg = LoggingConfig(wandb="offline", project="megaapo-test", run_name="t", plot=False)
    console, _ = _quiet_console()
    m = M.Metrics(cfg, tmp_path, {"algo": {"name": "apo", "kl_coef": 0.04}}, enabled=True, console=console)
    assert m.wandb_mode == "offline" and m.run_id
    for step in range(3):
        with m.timer("rollout"):
            pass
        m.log(step, _rows(step) | {"len/mean": torch.tensor(10.0 + step), "entropy": np.float32(0.5)})
    run_id = m.run_id
    m.finish(summary=False)

    run_files = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(run_files) == 1
    records = _read_wandb_records(run_files[0])
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    assert sorted(history) == [0, 1, 2]
    for step, item in history.items():
        assert item["reward/total"] == pytest.approx(0.25 * step)
        assert item["train/accuracy"] == pytest.approx(0.1 * step)
        assert item["len/mean"] == pytest.approx(10.0 + step) and item["entropy"] == pytest.approx(0.5)
        assert "time/rollout" in item and "time/step" in item
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["run_id"] == run_id and run["project"] == "megaapo-test"
    assert run["config"]["update"]["algo"] == {"name": "apo", "kl_coef": 0.04}

    # resume after a checkpoint at step 2: the same W&B run id continues
    m = M.Metrics(cfg, tmp_path, {}, enabled=True, console=console, start_step=2, run_id=run_id)
    assert m.run_id == run_id
    m.log(2, _rows(2))
    m.log(3, _rows(3))
    m.finish(summary=False)
    run_files = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"))
    assert len(run_files) == 2
    steps = [sorted(r["history"]["step"]["num"] for r in _read_wandb_records(f) if r["type"] == "history")
             for f in run_files]
    assert sorted(steps) == [[0, 1, 2], [2, 3]]
    assert [r["step"] for r in M.read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]


def test_wandb_never_prompts_and_never_crashes(tmp_path, monkeypatch, caplog):
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))   # no ~/.netrc: no credentials anywhere
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setattr(wandb, "init", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no network")))
    console, _ = _quiet_console()
    with caplog.at_level(logging.WARNING, logger="megaapo.metrics"):
        m = M.Metrics(LoggingConfig(wandb="online", plot=False), tmp_path / "run", {}, console=console)
        m.log(0, {"reward/total": 1.0})
        m.finish(summary=False)
    assert m.wandb_mode == "disabled" and m.run_id is None
    text = caplog.text
    assert "no credentials" in text and "W&B init failed" in text and "no network" in text
    assert len(M.read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 1


def test_jsonl_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = LoggingConfig(wandb="disabled", plot=False)
    console, _ = _quiet_console()
    ref = M.Metrics(cfg, tmp_path / "ref", enabled=True, console=console)
    for step in range(6):
        ref.log(step, _rows(step))
    ref.finish(summary=False)

    run = tmp_path / "run"
    m = M.Metrics(cfg, run, enabled=True, console=console)
    for step in range(5):
        m.log(step, _rows(step))
    with open(run / "metrics.jsonl", "a") as f:   # SIGKILL mid-line
        f.write('{"step": 5, "reward/to')
    # resume from the checkpoint after 3 steps: steps 3 and 4 are run again
    m = M.Metrics(cfg, run, enabled=True, console=console, start_step=3)
    assert [r["step"] for r in M.read_jsonl(run / "metrics.jsonl")] == [0, 1, 2]
    for step in range(3, 6):
        m.log(step, _rows(step))
    m.finish(summary=False)

    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(M.read_jsonl(run / "metrics.jsonl")) == strip(M.read_jsonl(tmp_path / "ref" / "metrics.jsonl"))
    assert (run / "metrics.jsonl").read_text().endswith("\n")
    # a fresh run (start_step=0) in the same directory starts a fresh file
    M.Metrics(cfg, run, enabled=True, console=console).finish(summary=False)
    assert M.read_jsonl(run / "metrics.jsonl") == []


def test_nonfinite_values_keep_the_jsonl_valid_json(tmp_path):
    """A diverged step logs NaN/inf: the file stays strict JSON (null, with the keys listed under "nonfinite"), the
    plot and tables skip them, and W&B still gets the floats."""
    cfg = LoggingConfig(wandb="disabled", plot=True)
    console, _ = _quiet_console()
    m = M.Metrics(cfg, tmp_path, enabled=True, console=console)
    m.log(0, {"kl": 0.5, "grad_norm": 1.0})
    logged = m.log(1, {"kl": float("nan"), "grad_norm": float("inf"), "entropy": -float("inf"), "reward/total": 1})
    m.log(2, {"kl": 0.25, "grad_norm": torch.tensor(float("nan"))})
    assert m.finish() is not None
    assert logged["kl"] != logged["kl"]   # what W&B receives is unchanged

    def strict(const):
        raise ValueError(f"not JSON: {const}")
    rows = [json.loads(line, parse_constant=strict) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["kl"] is None and rows[1]["grad_norm"] is None and rows[1]["entropy"] is None
    assert rows[1]["nonfinite"] == ["kl", "grad_norm", "entropy"] and rows[1]["reward/total"] == 1
    assert rows[2]["nonfinite"] == ["grad_norm"] and "nonfinite" not in rows[0]
    assert M._series(rows, "kl") == ([0, 2], [0.5, 0.25])


def test_resume_never_drops_rows_before_the_checkpoint(tmp_path):
    """Only rows past the checkpoint's step and a torn last line go; every earlier line stays as it was, even one
    no reader understands."""
    cfg = LoggingConfig(wandb="disabled", plot=False)
    console, _ = _quiet_console()
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "kl": s}) + "\n" for s in range(6)]
    lines.insert(2, "a line from another tool\n")
    path.write_text("".join(lines) + '{"step": 6, "k')
    M.Metrics(cfg, tmp_path, enabled=True, console=console, start_step=4).finish(summary=False)
    assert path.read_text() == "".join(lines[:5])


def test_timer_accumulates_per_step(tmp_path):
    m = M.Metrics(LoggingConfig(wandb="disabled", plot=False), tmp_path, console=_quiet_console()[0])
    for _ in range(3):
        with m.timer("reward"):
            sum(range(20000))
    row = m.log(0, {})
    assert row["time/reward"] > 0 and row["time/step"] >= row["time/reward"]
    assert "time/reward" not in m.log(1, {})
    with pytest.raises(TypeError, match="metric 'bad'"):
        m.log(2, {"bad": [1, 2]})


def test_plot_is_a_png(tmp_path):
    from PIL import Image

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "reward/total": 0.1 * s} | ({"eval/accuracy": 0.05 * s} if s % 5 == 0 else {})
            for s in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = M.plot(path, tmp_path / "plots" / "curve.png", title="demo")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
    # keys absent from the file still give a valid picture
    assert M.plot(path, tmp_path / "empty.png", keys=["nope"]).read_bytes()[:4] == b"\x89PNG"


def test_console_progress_and_summary(tmp_path):
    console, buf = _quiet_console()
    with M.Metrics(LoggingConfig(wandb="disabled", console_every=2), tmp_path, console=console) as m:
        with m.progress(total=4):
            for step in range(4):
                m.log(step, _rows(step) | {"eval/accuracy": 0.5})
    text = buf.getvalue()
    assert "step 0/4" in text and "step 2/4" in text and "step 1/4" not in text
    assert "reward 0.500" in text and "megaapo run summary" in text and "reward/total" in text
    assert (tmp_path / "metrics.png").is_file()
    assert "time per phase" in text
    table = M.summary_table(tmp_path / "metrics.jsonl")
    assert table.row_count == 4 and "4 steps" in table.caption
    assert M.timing_table(M.read_jsonl(tmp_path / "metrics.jsonl")).row_count == 1


# An RL step's console row, as the demo logs it: wider than 80 columns once formatted.
_WIDE = {"reward/total": 0.53125, "train/accuracy": 0.40625, "eval/accuracy": 0.625, "len/mean": 7.25,
         "kl": 1.2e-3, "entropy": 0.123, "clip_frac": 0.0, "perf/tokens_per_s": 12345.0}


def _console_run(tmp_path, terminal: bool, steps: int = 3):
    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=terminal, force_jupyter=False)
    with M.Metrics(LoggingConfig(wandb="disabled", plot=False), tmp_path, console=console) as m:
        with m.progress(total=steps):
            for step in range(1, steps + 1):   # the loops log step k after their k-th step
                m.log(step, _WIDE)
    return buf.getvalue()


def test_console_in_a_file_is_one_whole_line_per_step(tmp_path):
    """`megaapo train > log.txt`: every step is one line with every field, however long (rich used to wrap at 80
    columns in the middle of a field: "clip \\n0.000"), and no progress bar (it cannot redraw in a file)."""
    lines = _console_run(tmp_path, terminal=False).splitlines()
    steps = [x for x in lines if x.startswith("step ")]
    assert [x.split()[1] for x in steps] == ["1/3", "2/3", "3/3"]
    for x in steps:
        assert len(x) > 80 and "clip 0.000" in x and "eval_acc 0.625" in x and "s/step" in x
    for x in steps[1:]:   # the first row spans the start-up, so the ETA starts at the second
        assert x.endswith(("eta 0:00", "eta 0:01"))   # the ETA a file has instead of the bar
    assert steps[-1].endswith("eta 0:00")
    assert not any(x.startswith("RL") for x in lines)    # the bar's row ("RL ━━━ 3/3 ...") is absent


def test_eta_leaves_out_the_start_up(tmp_path, monkeypatch):
    """The first row logged (the demo's step-0 eval) spans the start-up: 1000 s of engine start and warm-up here,
    then 2 s per step. The ETA counts the steps only (it said 11:09 for the last 2 steps when it averaged the
    start-up in). A fake clock: waiting out a real start-up is not an option in a unit test."""
    now = [0.0]
    monkeypatch.setattr(M.time, "perf_counter", lambda: now[0])
    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=False, force_jupyter=False)
    with M.Metrics(LoggingConfig(wandb="disabled", plot=False), tmp_path, console=console) as m:
        with m.progress(total=4):
            for step, t in enumerate((1000.0, 1002.0, 1004.0)):
                now[0] = t
                m.log(step, _WIDE)
    steps = [x for x in buf.getvalue().splitlines() if x.startswith("step ")]
    assert "eta" not in steps[0]                          # no step timed yet
    assert steps[1].endswith("eta 0:06") and steps[2].endswith("eta 0:04")


def test_console_in_a_terminal_fits_its_width_above_a_live_bar(tmp_path):
    import re

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", _console_run(tmp_path, terminal=True))   # drop colours, cursor moves
    rows = [x for x in re.split(r"[\r\n]", text) if x.startswith("step ")]
    assert {x.split()[1] for x in rows} == {"1/3", "2/3", "3/3"}
    assert all(len(x) <= 80 and x.endswith("…") for x in rows)   # cropped, never wrapped onto a second line
    assert any(x.startswith("RL") and "3/3" in x for x in text.splitlines())   # the live bar, finished


def test_disabled_rank_writes_nothing(tmp_path):
    run = tmp_path / "run"
    m = M.Metrics(LoggingConfig(wandb="offline"), run, {"a": 1}, enabled=False)
    with m.progress(total=3):
        for step in range(3):
            with m.timer("rollout"):
                pass
            assert m.log(step, _rows(step)) == {}
    assert m.finish() is None and m.run_id is None
    assert not run.exists() and list(tmp_path.iterdir()) == []


def test_flops_per_token_and_mfu():
    # Qwen2.5-7B: 7.07e9 matmul parameters (7.62e9 minus the 0.545e9 input embedding); at seq_len 1 only 6N is left
    shape = dict(hidden_size=3584, num_layers=28, intermediate_size=18944, vocab_size=152064, num_heads=28,
                 num_kv_heads=4)
    n = 28 * (3584 * 3584 * 2 + 2 * 3584 * 512 + 3 * 3584 * 18944) + 3584 * 152064
    assert n == pytest.approx(7.07e9, rel=0.01)
    assert M.flops_per_token(**shape, seq_len=1) == 6 * n + 3 * 28 * 4 * 3584 * 1
    long, short = M.flops_per_token(**shape, seq_len=4095), M.flops_per_token(**shape, seq_len=1)
    assert long - short == 3 * 28 * 4 * 3584 * (4096 / 2 - 1)
    assert M.flops_per_token(**shape, seq_len=1, backward=False) == short / 3
    full = M.flops_per_token(**shape, seq_len=4095, causal=False)
    assert full - short == 3 * 28 * 4 * 3584 * (4095 - 1)
    assert M.mfu(2000.0, 1e9, 4e12) == pytest.approx(0.5) and M.mfu(2000.0, 1e9, None) is None
    assert M.device_peak_flops(device_name="NVIDIA H100 80GB HBM3") == 989e12
    assert M.device_peak_flops(device_name="NVIDIA H100 PCIe") == 756e12
    assert M.device_peak_flops("float32", device_name="NVIDIA A100-SXM4-80GB") == 156e12
    assert M.device_peak_flops(device_name="Some CPU") is None
