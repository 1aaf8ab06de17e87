"""benchmarks/async_rl.py from finished runs (`--reuse`): steps/s net of evals, idle shares, the k=0 seeds' spread
and each k=1 run checked against it, the timeline plot. (The runs themselves are whole `megaapo train` commands:
tests/test_async.py runs k=0 and k=1 loops.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _saved(out: Path, step_s: float, accs: list[float], whole: float) -> None:
    """A run of 4 RL steps taking step_s each (the first also runs a 1 s eval), evals at start and end."""
    out.mkdir(parents=True)
    rows = [{"step": 0, "eval/accuracy": accs[0]}]
    rows += [{"step": s, "time/step": step_s + (1.0 if s == 1 else 0.0), "time/eval": 1.0 if s == 1 else 0.0,
              "time/learner_idle": 0.25 * step_s, "time/engine_idle": 0.5 * step_s} for s in range(1, 5)]
    rows[-1]["eval/accuracy"] = accs[1]
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tl = [{"who": "learner", "what": "train", "t0": i * step_s, "t1": (i + 0.7) * step_s, "seq": i} for i in range(8)]
    tl += [{"who": "engine", "what": "generate", "t0": i * step_s, "t1": (i + 0.3) * step_s, "seq": i} for i in range(8)]
    (out / "timeline.jsonl").write_text("\n".join(json.dumps(r) for r in tl))
    (out / "bench.json").write_text(json.dumps({"whole": whole}))


def test_table_spread_and_plot_from_saved_runs(tmp_path):
    _saved(tmp_path / "k0_s0", 1.0, [0.25, 0.55], 400)
    _saved(tmp_path / "k1_s0", 0.5, [0.25, 0.50], 300)    # 2x, inside [0.45, 0.55]
    _saved(tmp_path / "k0_s1", 1.0, [0.25, 0.45], 400)
    _saved(tmp_path / "k1_s1", 0.8, [0.25, 0.30], 350)    # 1.25x, below the spread
    plot = tmp_path / "timeline.png"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "async_rl.py"), "--reuse", "--out", str(tmp_path),
                          "--seeds", "0,1", "--plot", str(plot)], capture_output=True, text=True, check=True).stdout
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[1:-1]]
            for line in out.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")}
    assert rows[("0", "0")][3:5] == ["1.000", "1.00x"] and rows[("1", "0")][3:5] == ["2.000", "2.00x"]
    assert rows[("1", "1")][3:7] == ["1.250", "1.25x", "25%", "50%"]   # the eval second left out of steps/s
    assert rows[("1", "0")][8] == "25.0% -> 50.0%; 50.0%" and rows[("1", "0")][9] == "300 s"
    assert "k=0 final held-out accuracy over 2 seeds: 45.0% .. 55.0% (mean 50.0%)" in out
    assert "k=1 seed 0: 50.0% -- within the k=0 spread" in out
    assert "k=1 seed 1: 30.0% -- OUTSIDE the k=0 spread" in out
    assert "k=1 / k=0 steps/s over seeds: min 1.25x, max 2.00x" in out
    assert plot.stat().st_size > 10_000
