"""Asynchronous RL benchmark: the CPU demo (configs/demo.yaml) at rollout.max_staleness=0 and =1 in one invocation,
same seed(s), same number of RL steps; prints steps/s, each side's idle share and held-out accuracy, and draws when
the engine and the learner are busy (from the runs' timeline.jsonl).

    python benchmarks/async_rl.py [--steps 20] [--warmup 200] [--seeds 0] [--eval-size 200] [--eval-every N]
                                  [--trainer-cpus 0] [--engine-cpus 1] [--plot docs/async_timeline.png]
                                  [--out DIR] [extra.overrides=...]

Thread budgets (megaapo/cpus.py): the trainer process is confined to --trainer-cpus with one torch thread per core
(trainer.cpus, trainer.threads), the engine process to --engine-cpus (rollout.engine_cpus: its OpenMP team and every
other thread), so on a 2-core machine each side has a core and k=1 can overlap them; k=0 runs under the same budget.
steps/s counts RL steps only (each step's time minus its held-out eval and checkpoint); the engine starts and the
supervised warm-up are before the first step ("whole run" is the command's wall time, all of it). Idle shares: the
learner's wait for a batch (k=0: all of rollout and reward scoring) and the engine's time with no generate or
weight load, over the RL steps' wall time. With several seeds, the k=0 runs' final accuracies give the spread each
k=1 run is checked against.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(out: Path, k: int, seed: int, args, extra: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    trainer_cpus = [int(c) for c in args.trainer_cpus.split(",")] if args.trainer_cpus else []
    cmd = [sys.executable, "-m", "megaapo.cli", "train", "demo", f"trainer.output_dir={out}",
           f"trainer.total_steps={args.steps}", f"trainer.sft_warmup_steps={args.warmup}",
           f"trainer.eval_every={args.eval_every or args.steps}", f"trainer.eval_size={args.eval_size}",
           f"trainer.threads={max(1, len(trainer_cpus))}", f"trainer.cpus=[{args.trainer_cpus}]",
           f"rollout.engine_cpus=[{args.engine_cpus}]", f"trainer.seed={seed}", f"data.seed={seed}",
           f"rollout.max_staleness={k}", "checkpoint.every=0", "checkpoint.export_hf=false",
           "logging.wandb=disabled", *extra]
    if not args.reuse:
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"k={k} seed={seed} failed:\n{res.stderr[-3000:]}")
        (out / "bench.json").write_text(json.dumps({"whole": time.perf_counter() - t0, "command": cmd}))
    whole = json.loads((out / "bench.json").read_text())["whole"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "time/step" in r and r["step"] >= 1]
    wall = sum(r["time/step"] - r.get("time/eval", 0.0) - r.get("time/checkpoint", 0.0) for r in steps)
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    timeline = [json.loads(x) for x in (out / "timeline.jsonl").read_text().splitlines() if x.strip()]
    return {"k": k, "seed": seed, "steps": len(steps), "wall": wall, "whole": whole, "steps_per_s": len(steps) / wall,
            "learner_idle": sum(r.get("time/learner_idle", 0.0) for r in steps) / wall,
            "engine_idle": sum(r.get("time/engine_idle", 0.0) for r in steps) / wall,
            "acc0": evals[0] if evals else float("nan"), "acc": evals[-1] if evals else float("nan"),
            "best": max(evals) if evals else float("nan"),
            "behind": max((r.get("async/versions_behind_max", 0) for r in steps), default=0),
            "timeline": timeline}


def spread_check(results: list[dict]) -> list[str]:
    """With several seeds: the k=0 final accuracies' range, and each k=1 run's final accuracy against it."""
    k0 = [r["acc"] for r in results if r["k"] == 0]
    if len(k0) < 2:
        return []
    lo, hi = min(k0), max(k0)
    lines = [f"k=0 final held-out accuracy over {len(k0)} seeds: {100 * lo:.1f}% .. {100 * hi:.1f}% "
             f"(mean {100 * sum(k0) / len(k0):.1f}%)"]
    for r in results:
        if r["k"] == 1:
            inside = lo <= r["acc"] <= hi
            lines.append(f"k=1 seed {r['seed']}: {100 * r['acc']:.1f}% -- "
                         f"{'within' if inside else 'OUTSIDE'} the k=0 spread")
    ratios = [r["steps_per_s"] / b["steps_per_s"] for r in results if r["k"] == 1
              for b in results if b["k"] == 0 and b["seed"] == r["seed"]]
    lines.append(f"k=1 / k=0 steps/s over seeds: min {min(ratios):.2f}x, max {max(ratios):.2f}x")
    return lines


def plot(results: list[dict], path: Path, steps: int = 4) -> None:
    """Busy intervals of the engine (generate, weight load) and the learner (train, weight sync) over a few
    mid-run steps, k=0 above k=1, on one time scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"generate": "tab:blue", "load": "tab:purple", "train": "tab:orange", "sync": "tab:red",
               "score": "tab:green", "wait": "lightgrey"}
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 1.6 * len(results) + 0.6), sharex=True)
    for ax, res in zip(axes if len(results) > 1 else [axes], results):
        tl = res["timeline"]
        trains = [r for r in tl if r["what"] == "train"]
        first = trains[min(2, len(trains) - 1)]   # skip the first steps (caches warm up)
        t0 = first["t0"] - 0.05
        t1 = trains[min(2 + steps, len(trains) - 1)]["t1"]
        lanes = {"engine": 1, "rewards": 0.5, "learner": 0}
        # the learner's step (train) spans its waits and its sync, drawn on top of it
        order = ["train", "wait", "generate", "score", "load", "sync"]
        for r in sorted((r for r in tl if r["what"] in order), key=lambda r: order.index(r["what"])):
            if r["t1"] < t0 or r["t0"] > t1:
                continue
            ax.broken_barh([(r["t0"] - t0, r["t1"] - r["t0"])], (lanes[r["who"]] - 0.18, 0.36),
                           color=colours[r["what"]])
        ax.set_yticks([0, 0.5, 1], ["learner", "rewards", "engine"])
        ax.set_xlim(0, t1 - t0)
        ax.set_title(f"rollout.max_staleness={res['k']}: {res['steps_per_s']:.3f} steps/s", fontsize=9, loc="left")
    axes_list = axes if len(results) > 1 else [axes]
    axes_list[-1].set_xlabel("seconds")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, list(colours), loc="upper right", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--seeds", default="0", help="comma-separated; each seed runs k=0 and k=1")
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=0, help="held-out eval every N steps (0: at the start and end)")
    ap.add_argument("--trainer-cpus", default="0", help="the trainer's cores (empty: all)")
    ap.add_argument("--engine-cpus", default="1", help="the engine's cores (empty: vLLM's default)")
    ap.add_argument("--plot", default="", help="write the busy/idle timeline here (PNG)")
    ap.add_argument("--out", default="", help="keep the run directories here (default: a temporary directory)")
    ap.add_argument("--reuse", action="store_true", help="run nothing: the table (and plot) from the runs in --out")
    ap.add_argument("extra", nargs="*", help="more config overrides for both runs")
    args = ap.parse_args()
    if args.reuse and not args.out:
        ap.error("--reuse needs --out, the directory of the earlier runs")
    results = []
    with tempfile.TemporaryDirectory(prefix="megaapo-async-") as tmp:
        root = Path(args.out or tmp)
        for seed in [int(s) for s in args.seeds.split(",")]:
            for k in (0, 1):   # the same seed at both k, k=0 first
                results.append(run(root / f"k{k}_s{seed}", k, seed, args, args.extra))
                r = results[-1]
                print(f"k={k} seed={seed}: {r['steps_per_s']:.3f} steps/s, held-out {100 * r['acc0']:.1f}% -> "
                      f"{100 * r['acc']:.1f}%, whole run {r['whole']:.0f} s", file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    flags = " ".join([f"--steps {args.steps} --warmup {args.warmup} --seeds {args.seeds} --eval-size {args.eval_size}",
                      f"--eval-every {args.eval_every}" if args.eval_every else "",
                      f"--trainer-cpus {args.trainer_cpus} --engine-cpus {args.engine_cpus}", *args.extra]).strip()
    print(f"Command: `benchmarks/async_rl.py {' '.join(flags.split())}` ({platform.machine()} CPU, {os.cpu_count()} "
          f"cores, {date.today()}; load average {load:.1f} at the end)\n")
    print("| k | seed | RL steps | steps/s | vs k=0 | learner idle | engine idle | max syncs behind | "
          "held-out accuracy (start -> end; best) | whole run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {r["seed"]: r["steps_per_s"] for r in results if r["k"] == 0}
    for r in results:
        print(f"| {r['k']} | {r['seed']} | {r['steps']} | {r['steps_per_s']:.3f} | "
              f"{r['steps_per_s'] / base[r['seed']]:.2f}x | {100 * r['learner_idle']:.0f}% | "
              f"{100 * r['engine_idle']:.0f}% | {r['behind']} | {100 * r['acc0']:.1f}% -> {100 * r['acc']:.1f}%; "
              f"{100 * r['best']:.1f}% | {r['whole']:.0f} s |")
    for line in spread_check(results):
        print(f"\n{line}" if line.startswith("k=0") else line)
    if args.plot:
        seed0 = results[0]["seed"]
        plot([r for r in results if r["seed"] == seed0], Path(args.plot))
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
