"""Helper processes that must outlive their job's stop signal (used by megaapo.dist_checkpoint).

A scheduler stops a job by signalling every process of it: SLURM's preemption and `scancel` send SIGTERM to the
whole job step, torchrun forwards it. The trainers catch it and save a last checkpoint before exiting; a helper
process that the save needs (megatron's checkpoint writer reports through a multiprocessing manager) must not die of
the same signal first. Such a helper ignores the stop signals and exits by itself once its parent is gone, so it
never outlives the run either. Standard library only: a spawned helper imports this module and nothing else.
"""

from __future__ import annotations

import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def shield_from_stop_signals(parent_pid: int, poll_s: float = 0.5) -> None:
    """Initializer of a helper process: ignore the stop signals (its parent handles them and still needs it), and
    exit once `parent_pid` is no longer its parent (the parent ended, even by SIGKILL: no orphan)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
