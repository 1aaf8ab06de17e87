"""benchmarks/gpu_check.py on CPU: the dry run lists every step within the 8-minute budget, the runner reports each
outcome (passed, failed, timed out, missing) and goes on, stopping a timed-out step's whole process group, and every
module the check imports can be imported on the GPU image, i.e. without vLLM and wandb.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    if "gpu_check" not in sys.modules:   # a script, not a package module: loaded by path (dataclasses need it listed)
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
        sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def test_dry_run_lists_every_step_within_the_budget():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    gc = _gpu_check()
    steps = gc.steps()
    assert [s.name for s in steps] == ["device", "wheels", "compile", "kernel-tests", "kernels-bench",
                                       "learner-bench", "memory-plan"]
    for s in steps:
        assert f"{s.name}" in proc.stdout and f"limit {s.limit:4d} s" in proc.stdout
        assert s.estimate < s.limit
    assert sum(s.limit for s in steps) <= gc.BUDGET_S == 480
    assert "fits" in proc.stdout.splitlines()[-1]


def test_runner_reports_each_outcome_and_goes_on(tmp_path):
    """Real subprocesses: a step that passes, one whose file is missing, one that fails, one that overruns its
    limit (it and the process it started are stopped), and a last one that still runs; $OUT gets the summary and
    the log after every step."""
    gc = _gpu_check()
    pidfile = tmp_path / "grandchild.pid"
    hang = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    steps = [gc.Step("first", "prints", ["{py}", "-c", "print('hello from first')"], 20, 5),
             gc.Step("absent", "a file that is not there", ["{py}", "nope.py"], 20, 5, needs="benchmarks/nope.py"),
             gc.Step("broken", "exits 3", ["{py}", "-c", "raise SystemExit(3)"], 20, 5),
             gc.Step("slow", "overruns", ["{py}", "-c", hang], 3, 1),
             gc.Step("last", "still runs", ["{py}", "-c", "print('hello from last')"], 20, 5)]
    out, results = tmp_path / "out", tmp_path / "results"
    results.mkdir()
    t0 = time.perf_counter()
    rc = gc.check(out, results, steps, docs=False)
    assert rc == 1
    assert time.perf_counter() - t0 < 45
    assert [s.status for s in steps] == ["passed", "missing", "failed", "timed out", "passed"]
    assert steps[2].detail == "exit status 3" and steps[3].seconds < 20
    grandchild = int(pidfile.read_text())
    for _ in range(50):    # the SIGTERM to the group reaches the grandchild too
        if not Path(f"/proc/{grandchild}").exists() or "zombie" in _state(grandchild):
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{grandchild}").exists() or "zombie" in _state(grandchild), "grandchild still running"
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["passed", "missing", "failed", "timed out", "passed"]
    log = (out / "gpu_check.log").read_text()
    assert "[first] hello from first" in log and "[last] hello from last" in log and "[slow] started" in log


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (FileNotFoundError, IndexError):
        return "zombie"


BLOCKER = r'''
import ast, importlib, importlib.util, sys
from pathlib import Path

class Block:   # the GPU image has neither: any import of them fails there
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("vllm", "wandb"):
            raise ImportError(f"{name} is not installed on the GPU image")

sys.meta_path.insert(0, Block())
root = Path(sys.argv[1])
sys.path[:0] = [str(root), str(root / "tests")]
OURS = ("megaapo", "kernels", "kernel_harness")

def ours(name):
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None
    return spec.origin if spec and spec.origin and spec.origin.startswith(str(root)) else None

def imported(path, package):
    """Every module an import statement anywhere in the file names (lazy imports in functions too)."""
    names = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base])
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] in OURS}

todo = [(None, root / f, "") for f in sys.argv[2:]]
seen = {}
while todo:
    name, path, package = todo.pop()
    for mod in imported(path, package):
        origin = ours(mod)
        if origin and mod not in seen:
            seen[mod] = origin
            todo.append((mod, origin, mod if origin.endswith("__init__.py") else mod.rpartition(".")[0]))
failed = []
for mod in sorted(seen):
    try:
        importlib.import_module(mod)
    except Exception as e:
        failed.append(f"{mod}: {type(e).__name__}: {e}")
print("MODULES", len(seen), " ".join(sorted(seen)))
print("FAILED", failed)
'''


def test_every_module_the_check_imports_works_without_vllm_and_wandb():
    """The closure of our modules that the steps' files import (import statements anywhere, so lazy ones count
    too), each imported in a fresh process where importing vllm or wandb fails, as on the GPU image."""
    gc = _gpu_check()
    files = ["benchmarks/gpu_check.py"] + [f for s in gc.steps() for f in s.files if (ROOT / f).exists()]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", BLOCKER, str(ROOT), *files], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = next(ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES")).split()[2:]
    assert {"kernels.compile_check", "kernels.fused_logprob", "megaapo.learner", "megaapo.models.tiny",
            "kernel_harness"} <= set(modules)
    failed = next(ln for ln in proc.stdout.splitlines() if ln.startswith("FAILED"))
    assert failed == "FAILED []", failed
