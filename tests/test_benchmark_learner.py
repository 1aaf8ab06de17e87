"""benchmarks/learner.py: the megatron learner is gone before the HF baseline loads (both on one GPU would share
its memory, and HF's peak would include the learner's), in a real smoke run of the script on CPU.
"""

from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_learner_is_freed_before_the_hf_baseline(monkeypatch, capsys):
    """Every parameter of the megatron model must be freed when the HF baseline starts. The automatic collector is
    off for the run, so only the script's own freeing counts: with megatron's DDP the learner's tensors sit in
    reference cycles (gradient hooks, buffers, optimizer), so a learner that merely went out of scope keeps them."""
    from megaapo.learner import Learner
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import learner as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    params, seen = [], {}
    init, real_hf = Learner.__init__, bench.bench_hf

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        params.extend(weakref.ref(p) for p in self.model.parameters())

    def spy(*args):
        seen["alive"] = sum(ref() is not None for ref in params)
        return real_hf(*args)

    monkeypatch.setattr(Learner, "__init__", tracked_init)
    monkeypatch.setattr(bench, "bench_hf", spy)
    # megatron's DDP and distributed optimizer, as on a GPU (auto picks them there; on CPU they run on gloo)
    monkeypatch.setattr(sys, "argv", ["learner.py", "--smoke", "--optim", "megatron"])
    enabled = gc.isenabled()
    gc.disable()
    try:
        bench.main()
    finally:
        if enabled:
            gc.enable()
    assert params and "alive" in seen, "the learner or the HF baseline did not run"
    assert seen["alive"] == 0, f"{seen['alive']} of the learner's {len(params)} parameters alive when HF loads"
    out = capsys.readouterr().out
    assert "| megaapo learner" in out and "| HF transformers" in out
