"""Reward scoring in a worker pool, with a deadline for the whole batch.

Called by the training loop and evaluation on every batch of responses. A pathological response (huge LaTeX, deep
nesting, a power tower sympy tries to evaluate) must never stall a run, and several of them must not stall it
several times over. How a batch is scored:

1. Responses go to the `num_workers` workers in chunks (one task per response would spend more time in IPC than in
   scoring). A worker gives each response `stall_s` (a tenth of `timeout_s`; ordinary ones take milliseconds): a
   SIGALRM interrupts one that takes longer, the worker reports it as slow and goes on with its chunk.
2. Slow responses are quarantined: each is scored again in a process of its own (up to 16 at a time, forked from
   the warm forkserver), so several of them run side by side rather than one after another, while the workers go
   on with the other chunks. A computation no signal interrupts (one huge C-level integer power) makes its worker
   exit after 2 x `stall_s` (faulthandler's watchdog); that chunk's responses are all quarantined.
3. The batch ends when everything is scored, or at its deadline: `timeout_s` after the batch started (but at least
   `quarantine_s` after a response was quarantined, so that a merely slow response is still scored). What is
   unscored then scores 0 and is counted as a timeout; its process is killed.

So a batch takes about `timeout_s` plus scheduling however many responses time out (timed in
`tests/test_rewards.py`), where it used to take about `timeout_s` twice per pathological response, one after
another. A reward that raises scores 0 and is counted as an error. `num_workers=0` scores in-process (debugging;
math-verify's own SIGALRM timeouts still apply there).
"""

from __future__ import annotations

import faulthandler
import functools
import multiprocessing as mp
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait
from dataclasses import dataclass, field, replace
from multiprocessing import popen_forkserver, spawn
from typing import Optional

from megaapo.rewards import RewardInput, score_components

QUARANTINE_WORKERS = 16
_SLOW, _ERROR = "slow", "error"


@dataclass
class RewardBatch:
    """Scores of a batch, in input order."""
    total: list[float]
    components: dict[str, list[float]]
    timeouts: int = 0
    errors: int = 0
    seconds: float = 0.0
    failed: list[int] = field(default_factory=list)   # indices of responses that timed out or errored


class _Slow(BaseException):
    """Raised by the stall alarm. Not an Exception: math-verify and sympy catch those and would return a verdict
    for an answer they never finished checking."""


def _on_alarm(signum, frame) -> None:
    raise _Slow()


def _score_chunk(inputs: list[RewardInput], names: list[str], stall_s: float) -> list:
    """Each response's components, or _SLOW (over stall_s: interrupted) or _ERROR (a reward raised). A response stuck
    where no signal handler can run (one huge C-level integer power) makes the worker exit after 2 x stall_s:
    faulthandler's watchdog thread needs no GIL."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    out: list = []
    try:
        for x in inputs:
            try:
                faulthandler.dump_traceback_later(2 * stall_s, exit=True, file=_devnull())
                signal.setitimer(signal.ITIMER_REAL, stall_s)
                out.append(score_components(x, names))
            except _Slow:
                out.append(_SLOW)
            except Exception:  # noqa: BLE001 -- a bug in a reward must not lose the rest of the chunk
                out.append(_ERROR)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                faulthandler.cancel_dump_traceback_later()
    finally:   # also when the alarm fired inside the inner `finally`: no watchdog may outlive the chunk
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)
    return out


@functools.lru_cache(maxsize=1)
def _devnull():
    return open(os.devnull, "w")


# ---------------------------------------------------------------------------------------------------- processes
class _LeanPopen(popen_forkserver.Popen):
    """Starts a forkserver child without re-importing the parent's `__main__` in it. multiprocessing does that for
    pickled references into `__main__`, which the reward code never sends; under `torchrun -m megaapo.train` it
    would make every worker, replacement and quarantine process import torch (~6 s each on 2 cores)."""

    _lock = threading.Lock()

    def _launch(self, process_obj):
        real = spawn.get_preparation_data

        def without_main(name):
            data = real(name)
            data.pop("init_main_from_name", None)
            data.pop("init_main_from_path", None)
            return data

        with self._lock:
            spawn.get_preparation_data = without_main
            try:
                super()._launch(process_obj)
            finally:
                spawn.get_preparation_data = real


class _LeanProcess(mp.context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        return _LeanPopen(process_obj)


class _LeanContext(mp.context.ForkServerContext):
    Process = _LeanProcess


def _init_worker() -> None:
    from megaapo.rewards import answers

    answers.set_inner_timeout(None)   # the pool times responses out itself (and counts them)


def _score_alone(x: RewardInput, names: list[str]):
    """A quarantined response, in a process of its own (no time limit: the batch kills it at its deadline)."""
    _init_worker()
    try:
        return score_components(x, names)
    except Exception:  # noqa: BLE001 -- counted as an error
        return _ERROR


class RewardScorer:
    """Weighted sum of registered rewards, scored with a batch deadline.

        scorer = RewardScorer({"accuracy": 1.0, "format": 0.5}, num_workers=2, timeout_s=5)
        batch = scorer.score([RewardInput(resp, answer="3"), ...])
        scorer.close()
    """

    def __init__(self, functions: dict[str, float], *, num_workers: int = 2, timeout_s: float = 5.0,
                 alpha: float = 0.1, faithful_to: str = "paper"):
        from megaapo.rewards import REWARDS

        for name in functions:
            REWARDS.get(name)  # unknown names fail here, with the registered ones listed
        self.functions = dict(functions)
        self.timeout_s = timeout_s
        # what a response gets in a worker before it is quarantined, and the least time it then gets there
        self.stall_s = min(1.0, max(0.05, timeout_s / 10))
        self.quarantine_s = min(timeout_s, 2 * self.stall_s + 0.5)
        self.alpha = alpha
        self.faithful_to = faithful_to
        self._pool = None
        self.num_workers = num_workers
        if num_workers > 0:
            from pebble import ProcessPool

            # forkserver: children never inherit the trainer's threads (vLLM, torch), and restarts after a timeout
            # are cheap because the server has already imported (and warmed up) the reward code. `_forkserver` moves the server
            # and its workers out of the trainer's process group, so a SIGTERM sent to that group (torchrun stopping
            # the trainer for a checkpoint) leaves them scoring until the trainer closes the pool.
            self._ctx = _LeanContext()
            self._ctx.set_forkserver_preload(["megaapo.rewards", "megaapo.rewards._forkserver", "pebble"])
            self._pool = ProcessPool(max_workers=num_workers, initializer=_init_worker, context=self._ctx)

    def score(self, inputs: list[RewardInput], names: Optional[list[str]] = None) -> RewardBatch:
        """Score every input; `names` picks other registered components than the configured ones (evaluation asks
        for accuracy and format whatever the training reward is); the total weighs only configured components."""
        from megaapo.rewards import REWARDS

        t0 = time.perf_counter()
        names = list(self.functions) if names is None else list(names)
        for n in names:
            REWARDS.get(n)  # an unknown name fails here, with the registered ones listed
        # the scorer's settings travel with each input; copies, so the caller's objects are left as they were
        inputs = [replace(x, alpha=self.alpha, faithful_to=self.faithful_to) for x in inputs]
        if self._pool is None:
            results, timeouts, errors, failed = [score_components(x, names) for x in inputs], 0, 0, []
        else:
            results, timeouts, errors, failed = _Batch(self, inputs, names).run()
        components = {n: [r[n] for r in results] for n in names}
        total = [sum(self.functions.get(n, 0.0) * r[n] for n in names) for r in results]
        return RewardBatch(total=total, components=components, timeouts=timeouts, errors=errors,
                           seconds=time.perf_counter() - t0, failed=failed)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool.join(timeout=10)
            self._pool = None

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Batch:
    """One batch through the pool: chunks, quarantine, deadline (see the module docstring)."""

    def __init__(self, scorer: RewardScorer, inputs: list[RewardInput], names: list[str]):
        self.s, self.inputs, self.names = scorer, inputs, names
        self.deadline = time.monotonic() + scorer.timeout_s
        self.results: list[Optional[dict]] = [None] * len(inputs)
        self.errors: set[int] = set()
        self.owner: dict = {}          # future -> ("chunk", [indices]) or ("one", index)
        self.waiting: list[int] = []   # quarantined responses not yet started (at most QUARANTINE_WORKERS run)

    def run(self) -> tuple[list[dict], int, int, list[int]]:
        n, w = len(self.inputs), self.s.num_workers
        size = max(1, min(64, -(-n // (4 * w))))
        for lo in range(0, n, size):
            idx = list(range(lo, min(lo + size, n)))
            fut = self.s._pool.schedule(_score_chunk, args=([self.inputs[j] for j in idx], self.names,
                                                            self.s.stall_s), timeout=self.s.timeout_s)
            self.owner[fut] = ("chunk", idx)
        try:
            self._collect()
        finally:
            for f in self.owner:   # past the deadline: a cancelled quarantine process is killed by its pebble thread
                f.cancel()
        zero = {name: 0.0 for name in self.names}
        failed = [j for j, r in enumerate(self.results) if r is None]
        timeouts = sum(1 for j in failed if j not in self.errors)
        return [r if r is not None else zero for r in self.results], timeouts, len(self.errors), failed

    def _collect(self) -> None:
        while self.owner:
            chunks_left = any(kind == "chunk" for kind, _ in self.owner.values())
            # the workers' chunks end by themselves (or are killed at timeout_s); quarantined ones at the deadline
            left = None if chunks_left else self.deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            done, _ = wait(list(self.owner), timeout=left, return_when=FIRST_COMPLETED)
            for f in done:
                self._take(f)
            self._launch()

    def _take(self, fut) -> None:
        kind, what = self.owner.pop(fut)
        try:
            result = fut.result()
        except (FutureTimeout, Exception):  # noqa: BLE001 -- killed or crashed: score its responses alone
            if kind == "chunk":
                self._quarantine(what)
            else:
                self.errors.add(what)
            return
        if kind == "one":
            what, result = [what], [result]
        slow = []
        for j, r in zip(what, result):
            if r == _SLOW:
                slow.append(j)
            elif r == _ERROR:
                self.errors.add(j)
            else:
                self.results[j] = r
        if slow:
            self._quarantine(slow)

    def _quarantine(self, idx: list[int]) -> None:
        """Score responses again, each on its own; they get at least `quarantine_s`."""
        self.deadline = max(self.deadline, time.monotonic() + self.s.quarantine_s)
        self.waiting.extend(idx)

    def _launch(self) -> None:
        from pebble import concurrent

        running = sum(1 for kind, _ in self.owner.values() if kind == "one")
        # pebble's own timeout is only a backstop, later than the deadline: the batch cancels first (and a cancel
        # racing pebble's timeout would make pebble's thread raise)
        alone = concurrent.process(timeout=self.s.timeout_s + 5, context=self.s._ctx)(_score_alone)
        while self.waiting and running < QUARANTINE_WORKERS:
            j = self.waiting.pop(0)
            self.owner[alone(self.inputs[j], self.names)] = ("one", j)
            running += 1
