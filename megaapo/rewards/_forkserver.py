"""Preloaded by the reward pool's forkserver (see `pool.RewardScorer`): puts the forkserver, and so every worker it
forks, in a process group of its own.

Launchers stop a trainer by signalling its whole process group (torchrun forwards SIGTERM with killpg, a terminal
sends ^C to the foreground group). The trainer turns that signal into "save at the next step, then exit" and still
needs its reward workers to finish the step; the pool, not the signal, ends them (`RewardScorer.close`), and the
forkserver exits by itself when the trainer closes its end of the alive pipe.
"""

import os
import sys

# Only in the forkserver (`python -c 'from multiprocessing.forkserver import main; ...'`), never in a process that
# merely imports this module.
if sys.argv[:1] == ["-c"] and "multiprocessing.forkserver" in sys.modules and os.getpid() != os.getsid(0):
    os.setpgid(0, 0)
