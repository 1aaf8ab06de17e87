"""Reward scoring throughput: responses scored per second, in-process vs the worker pool (per-response timeouts).

    python benchmarks/rewards.py [--n 2000] [--workers 2]

Responses are distinct (no cache hits): R1-style answers checked by math-verify (numbers, fractions, LaTeX,
letters, wrong answers) and R1-VL step responses scored by StepRAR + StepRVR, as the paper reads them and as R1-VL's
script does (`faithful_to=code`: math-verify on the whole response). Prints a table; the pool's ratio against
in-process scoring is measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from datetime import date

from megaapo.rewards import RewardInput, answers
from megaapo.rewards.pool import RewardScorer


def make_inputs(n: int, seed: int = 0) -> tuple[list[RewardInput], list[RewardInput]]:
    rng = random.Random(seed)
    r1, steps = [], []
    for i in range(n):
        a, b = rng.randint(1, 999), rng.randint(1, 99)
        gold = str(a + b)
        pred = rng.choice([gold, str(a + b + 1), f"\\frac{{{2 * (a + b)}}}{{2}}", f"{a + b}.0", f"${a} + {b}$",
                           rng.choice("ABCD")])
        r1.append(RewardInput(f"<think>add {a} and {b} (case {i})</think> <answer>{pred}</answer>", gold))
        sol = (f"### Image Description: numbers {a} and {b}. ### Rationales: add them. ### Let's think step by step. "
               f"### Step 1: Read {a} and {b}. ### Step 2: {a} + {b} = {a + b}. ### The final answer is: {pred}")
        steps.append(RewardInput(sol, gold, key_steps=[[f"{a} + {b} = {a + b}", f"{a}+{b}={a + b}"], [f"read {a}"]]))
    return r1, steps


def bench(functions: dict, inputs: list[RewardInput], workers: int, faithful_to: str = "paper") -> float:
    answers._parse.cache_clear()  # every configuration starts with a cold parse cache, as the workers do
    with RewardScorer(functions, num_workers=workers, timeout_s=10, faithful_to=faithful_to) as scorer:
        scorer.score(inputs[:8])  # warm the workers (imports, first parse)
        t0 = time.perf_counter()
        batch = scorer.score(inputs)
        dt = time.perf_counter() - t0
    assert batch.timeouts == 0 and batch.errors == 0
    return len(inputs) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    r1, steps = make_inputs(args.n)
    rows = []
    step_fns = {"step_rar": 1.0, "step_rvr": 1.0}
    for name, fns, data, mode in (("accuracy+format (math-verify)", {"accuracy": 1.0, "format": 0.5}, r1, "paper"),
                                  ("step_rar+step_rvr", step_fns, steps, "paper"),
                                  ("step_rar+step_rvr, faithful_to=code", step_fns, steps, "code")):
        base = bench(fns, data, 0, mode)
        pool = bench(fns, [RewardInput(x.response + " ", x.answer, x.key_steps) for x in data], args.workers, mode)
        rows.append((name, base, pool))
    print(f"reward scoring, {args.n} distinct responses, {os.cpu_count()} cores ({platform.processor() or 'cpu'}), "
          f"{date.today()}")
    print(f"| rewards | in-process resp/s | pool ({args.workers} workers) resp/s | pool / in-process |")
    print("|---|---|---|---|")
    for name, base, pool in rows:
        print(f"| {name} | {base:,.0f} | {pool:,.0f} | {pool / base:.2f}x |")


if __name__ == "__main__":
    main()
