"""The demo's result over seeds: the whole `megaapo train` command at N values of `trainer.seed`, one after another.

    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4                 # the table (about 6 minutes a seed)
    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4 --write-docs    # ... and put it in docs/demo.md
    python benchmarks/demo_seeds.py --seeds 0 1 -- trainer.total_steps=100   # overrides go to every run
    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4 --reuse --write-docs    # the table from finished runs

Each run is what a user runs after setup, timed from the command's start to its exit: a fresh run directory (so
the tiny model and the synthetic data are built as on a first run), the engine start, the warm-up, RL, the evals,
checkpoints and the HF export. Runs are sequential: two at once would share the 2 cores and time each other.
Prints one row per seed (held-out greedy accuracy at the start of RL, at the end, the gain, the best eval and how
far the end is below it, wall time), then the mean, median and minimum over seeds, and whether every seed meets
the demo's bar (`--min-gain`, `--max-drop`, `--max-seconds`). Each run's load average at its start and end is in its
row, and the first start's and last end's head the table: a timing taken on a busy machine is not a result.
Each finished run leaves OUT/seed_S.json (its row, with the config overrides it ran with); `--reuse` takes a seed's row
from there instead of running it again when the overrides match (to build one table from runs made at different
times, e.g. two invocations splitting the seeds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "demo.md"
START, END = "<!-- demo-seeds:start -->", "<!-- demo-seeds:end -->"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--preset", default="demo")
    p.add_argument("--out", default=str(ROOT / "runs" / "demo_seeds"), help="run directories: OUT/seed_S")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one run may take before it is stopped")
    p.add_argument("--min-gain", type=float, default=30.0, help="points of held-out accuracy every seed must gain")
    p.add_argument("--max-drop", type=float, default=10.0, help="points the last eval may lie below the run's best")
    p.add_argument("--max-seconds", type=float, default=360.0, help="wall time every run must stay within")
    p.add_argument("--write-docs", action="store_true", help="replace the table in docs/demo.md")
    p.add_argument("--reuse", action="store_true", help="take a seed's row from OUT/seed_S.json when it exists")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (after --)")
    return p.parse_args(argv)


def run_seed(seed: int, args) -> dict:
    """One whole `megaapo train` at this seed; its held-out evals (in points), wall time and load averages."""
    out = Path(args.out) / f"seed_{seed}"
    saved = out.parent / f"seed_{seed}.json"
    if args.reuse and saved.is_file():
        row = json.loads(saved.read_text())
        if row.get("preset") == args.preset and row.get("overrides") == args.overrides:
            return row
        print(f"seed {seed}: {saved} ran another preset or other overrides; running again", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "megaapo.cli", "train", args.preset, f"trainer.seed={seed}",
           f"trainer.output_dir={out}", *args.overrides]
    log_path = out.parent / f"seed_{seed}.log"
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            res = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout,
                                 env=dict(os.environ, PYTHONUNBUFFERED="1"))
        except subprocess.TimeoutExpired:
            raise SystemExit(f"seed {seed}: stopped after --timeout {args.timeout:.0f} s (a busy machine? see the "
                             f"load average; its evals so far are in {out / 'metrics.jsonl'}); log: {log_path}")
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"seed {seed}: `{' '.join(cmd)}` exited with {res.returncode}; see {log_path}")
    evals = [(r["step"], 100 * r["eval/accuracy"]) for r in map(json.loads, (out / "metrics.jsonl").open())
             if "eval/accuracy" in r]
    if len(evals) < 2:
        raise SystemExit(f"seed {seed}: fewer than two held-out evals in {out / 'metrics.jsonl'}")
    accs = [a for _, a in evals]
    row = {"seed": seed, "start": accs[0], "end": accs[-1], "gain": accs[-1] - accs[0], "best": max(accs),
           "below_best": max(accs) - accs[-1], "seconds": wall, "evals": evals, "preset": args.preset,
           "overrides": args.overrides, "load": [load_start, os.getloadavg()[0]],
           "date": datetime.date.today().isoformat()}
    saved.write_text(json.dumps(row))
    return row


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def mmss(seconds: float) -> str:
    return f"{int(seconds) // 60}:{seconds % 60:04.1f}"


def table(rows: list[dict], args) -> str:
    """The rows' own dates and load averages (a table rebuilt with --reuse says when and how busy the runs were, not
    the moment of rebuilding)."""
    cmd = "python benchmarks/demo_seeds.py --seeds " + " ".join(str(r["seed"]) for r in rows)
    cmd += (" -- " + " ".join(args.overrides)) if args.overrides else ""
    dates = ", ".join(sorted({r["date"] for r in rows}))
    lines = [f"{machine()}; {dates}; load average (1 min) {rows[0]['load'][0]:.2f} at the first run's start, "
             f"{rows[-1]['load'][1]:.2f} at the last one's end; `{cmd}`", "",
             "| seed | start | end | gain | best | end below best | wall time | load (1 min) at start, end |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['start']:.1f}% | {r['end']:.1f}% | {r['gain']:+.1f} | {r['best']:.1f}% | "
                     f"{r['below_best']:.1f} | {mmss(r['seconds'])} | {r['load'][0]:.2f}, {r['load'][1]:.2f} |")
    gains, walls = [r["gain"] for r in rows], [r["seconds"] for r in rows]
    for name, fn in (("mean", statistics.mean), ("median", statistics.median), ("min", min), ("max", max)):
        ends, drops = [r["end"] for r in rows], [r["below_best"] for r in rows]
        lines.append(f"| {name} | | {fn(ends):.1f}% | {fn(gains):+.1f} | | {fn(drops):.1f} | {mmss(fn(walls))} | |")
    ok = all(r["gain"] >= args.min_gain and r["below_best"] <= args.max_drop and r["seconds"] <= args.max_seconds
             for r in rows)
    lines += ["", f"Every seed: gain >= {args.min_gain:+.0f} points, end within {args.max_drop:.0f} points of its best, "
                  f"wall time <= {mmss(args.max_seconds)}: **{'yes' if ok else 'no'}**.",
              f"Held-out accuracy (%) at steps {', '.join(str(s) for s, _ in rows[0]['evals'])}, per seed: " + "; ".join(
                  f"{r['seed']}: " + " ".join(f"{a:.1f}" for _, a in r["evals"]) for r in rows) + "."]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    doc = DOC.read_text()
    if START not in doc:
        raise SystemExit(f"{DOC} has no {START} ... {END} section to replace")
    DOC.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{text}\n{END}", doc,
                          flags=re.S))
    print(f"wrote {DOC}")


def main(argv=None) -> int:
    args = parse(argv)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args))
        r = rows[-1]
        print(f"seed {seed}: {r['start']:.1f}% -> {r['end']:.1f}% ({r['gain']:+.1f} points, best {r['best']:.1f}%) "
              f"in {mmss(r['seconds'])}", flush=True)
    text = table(rows, args)
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
