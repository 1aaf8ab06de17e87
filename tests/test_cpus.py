"""CPU budgets (megaapo/cpus.py): core lists, the refusal of a core the process was not given, and confinement of
every thread of a process, including threads that already run (the engine side is checked on a real vLLM engine in
tests/test_rollout.py::test_engine_leaves_no_temporary_files_and_keeps_to_its_cores)."""

import json
import os
import subprocess
import sys

import pytest

from megaapo import cpus
from megaapo.config import ConfigError


def test_parse_takes_plain_core_lists_and_leaves_vllms_own_forms_alone():
    assert cpus.parse("1") == [1]
    assert cpus.parse("2-3,0") == [0, 2, 3]
    assert cpus.parse(" 0, 1 ") == [0, 1]
    for own in ("auto", "all", "nobind", "0-1|2-3", ""):
        assert cpus.parse(own) is None
    assert cpus.engine_env([]) == {}
    assert cpus.engine_env([1, 2]) == {"VLLM_CPU_OMP_THREADS_BIND": "1,2", "OMP_NUM_THREADS": "2"}


def test_a_core_the_process_was_not_given_is_refused_with_the_key():
    given = sorted(os.sched_getaffinity(0))
    assert cpus.check(given[:1], "trainer.cpus") == given[:1]
    with pytest.raises(ConfigError, match=rf"trainer.cpus=\[{given[-1] + 64}\]: core\(s\) \[{given[-1] + 64}\]"):
        cpus.check([given[-1] + 64], "trainer.cpus")
    with pytest.raises(ConfigError, match=r"rollout.engine_cpus=\['one'\]: give core numbers"):
        cpus.check(["one"], "rollout.engine_cpus")


def test_confinement_holds_every_thread_and_what_starts_later():
    """A thread that runs before the pin (as an OpenMP pool or a monitor thread would) is moved too; a thread and a
    child process started after it inherit the cores; OMP_NUM_THREADS follows the engine's core list."""
    core = min(os.sched_getaffinity(0))
    code = f"""
import json, os, subprocess, sys, threading, time
from megaapo import cpus
early = threading.Thread(target=time.sleep, args=(5,), daemon=True); early.start()
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "{core}"
os.environ.pop("OMP_NUM_THREADS", None)
got = cpus.confine_engine()
late = threading.Thread(target=time.sleep, args=(5,), daemon=True); late.start()
child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                       capture_output=True, text=True).stdout.strip()
print(json.dumps({{"got": got, "omp": os.environ["OMP_NUM_THREADS"], "child": child,
                  "threads": [sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    res = json.loads(out.splitlines()[-1])
    assert res["got"] == [core] and res["omp"] == "1" and res["child"] == f"[{core}]"
    assert len(res["threads"]) >= 3 and all(t == [core] for t in res["threads"])


def test_split_gives_the_trainer_the_first_half_and_the_engines_the_rest():
    assert cpus.split([1, 0]) == ([0], [1])
    assert cpus.split([2, 3, 6]) == ([2, 3], [6])
    assert cpus.split(range(4)) == ([0, 1], [2, 3])
    assert cpus.split([5]) is None


def test_cpu_split_fills_the_budgets_only_where_one_trainer_starts_cpu_engines(monkeypatch):
    """`trainer.cpu_split` (the CPU demo's layout), resolved by the run from the cores it was started on: applied to
    a single CPU trainer with engines of its own; left alone where the budgets are given, the engines are someone
    else's, or torchrun started several trainer processes."""
    from megaapo.config import load_config
    from megaapo.run import Run

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    base = ["trainer.cpu_split=true", "trainer.device=cpu", "trainer.threads=2"]

    def resolved(*overrides):
        cfg = load_config("demo", [*base, *overrides])
        Run(cfg)._split_cpus()
        return cfg.trainer.cpus, cfg.rollout.engine_cpus, cfg.trainer.threads

    given = cpus.given()
    want = cpus.split(given)
    assert resolved() == ((want[0], want[1], len(want[0])) if want else ([], [], 2))
    assert resolved(f"trainer.cpus=[{given[0]}]") == ([given[0]], [], 2)
    assert resolved("rollout.addresses=[tcp://127.0.0.1:9]") == ([], [], 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolved() == ([], [], 2)
