"""Every Triton kernel variant the launchers can start compiles for sm_80, sm_90 and sm_100 without spills and within
shared memory (kernels/compile_check.py, run as CI runs it: Triton's compiler and the wheel's ptxas, no GPU), the
table in docs/kernels.md matches the variants, and the checker's own coverage rules catch what they should.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(INTERPRET, reason="compiles the real kernels, not the interpreter's")


@pytest.mark.slow
def test_every_launched_variant_compiles(tmp_path):
    """The whole check in a child process (it installs a fake process group for the TP launches): every launch
    site reached, every variant compiled for the three architectures with no spill and shared memory in bounds."""
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["problems"] == []
    rows = result["rows"]
    assert {r["arch"] for r in rows} == {80, 90, 100}
    assert all("error" not in r and r["spill_stores"] == r["spill_loads"] == 0 for r in rows)
    # the table kept in docs/kernels.md lists the same kernels with the same numbers of variants
    counts = {}
    for r in rows:
        counts.setdefault(r["kernel"], set()).add(r["variant"])
    block = (ROOT / "docs" / "kernels.md").read_text().split("<!-- compile-check:start -->")[1]
    documented = dict(re.findall(r"^\| `(\w+)` \| (\d+) \|", block.split("<!-- compile-check:end -->")[0], re.M))
    assert documented == {k: str(len(v)) for k, v in counts.items()}, \
        "docs/kernels.md is stale: run `python -m kernels.compile_check --write-docs`"


def test_launch_sites_and_coverage_rules():
    """Every kernel launched in kernels/ is found at its call site; a site never reached, and a bool constexpr
    that only ever took one value there, are reported."""
    from kernels import compile_check as cc
    sites = cc.launch_sites()
    assert sorted(s["kernel"] for s in sites) == ["_forward_kernel", "_grad_kernel", "_group_adv_kernel",
                                                  "_row_grad_kernel", "_row_stats_kernel"]
    assert len(cc.coverage_problems([])) == len(sites)
    site = next(s for s in sites if s["kernel"] == "_row_grad_kernel")
    assert {"HAS_B", "ROW_ALIGNED"} <= set(site["exprs"])
    module = site["module"]
    launch = cc.Launch(module._row_grad_kernel, "_row_grad_kernel", (site["file"], site["lines"][0]), (),
                       dict(HAS_B=True, ROW_ALIGNED=False))
    again = cc.Launch(module._row_grad_kernel, "_row_grad_kernel", (site["file"], site["lines"][0]), (),
                      dict(HAS_B=True, ROW_ALIGNED=True))
    problems = [p for p in cc.coverage_problems([launch, again]) if "_row_grad_kernel" in p]
    assert problems == [f"fused_logprob.py:{site['lines'][0]} (_row_grad_kernel): HAS_B was always True "
                        f"(extend the drivers in compile_check)"]
