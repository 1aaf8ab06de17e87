"""Preloaded by the reward pool's forkserver (see `pool.RewardScorer`): puts the forkserver, and so every worker it
forks, in a process group of its own.

Launchers stop a trainer by signalling its whole process group (torchrun forwards SIGTERM with killpg, a terminal
sends ^C to the foreground group). The trainer turns that signal into "save at the next step, then exit" and still
needs its reward workers to finish the step; the pool, not the signal, ends them (`RewardScorer.close`), and the
forkserver exits by itself when the trainer closes its end of the alive pipe. It also warms math-verify up for
every worker it forks (below).
"""

import os
import sys

# Only in the forkserver (`python -c 'from multiprocessing.forkserver import main; ...'`), never in a process that
# merely imports this module.
if sys.argv[:1] == ["-c"] and "multiprocessing.forkserver" in sys.modules:
    if os.getpid() != os.getsid(0):
        os.setpgid(0, 0)
    # math-verify builds its parsers, and sympy loads its simplification code, on first use (~2 s for the first
    # fraction compared with an integer): done once here, so every worker forked from this server (a replacement
    # after a timeout, a quarantine process) starts warm and scores ordinary answers in milliseconds.
    from megaapo.rewards import RewardInput, score_components

    for given, gold in (("\\frac{8}{2}", "3"), ("x^2+1", "2"), ("\\sqrt{2}", "1.4"), ("(1, 2)", "(1, 3)"),
                        ("3.14", "\\pi"), ("B", "A")):
        score_components(RewardInput(f"<think>x</think><answer>{given}</answer>", gold), ["accuracy", "format"])
