"""One `error:` line instead of a traceback for what a user can act on: shared by the entry points (`megaapo` in
`megaapo.cli`, and the torchrun entry points `megaapo.train` / `megaapo.sft`), so none of them imports another."""

from __future__ import annotations

import sys

from megaapo import rundir


def report_errors(fn, verbose: bool = False) -> int:
    """fn()'s exit code; an error a user can act on becomes one `error:` line on stderr instead of a traceback
    (`megaapo` and the torchrun entry points `megaapo.train` / `megaapo.sft`)."""
    from megaapo.checkpoint import CheckpointError
    from megaapo.config import ConfigError
    from megaapo.data.schema import DataError
    from megaapo.optim import NonFiniteError
    from megaapo.rollout.types import EngineError

    try:
        return fn()
    except (ConfigError, DataError, FileNotFoundError, ValueError, CheckpointError, rundir.RunDirError) as e:
        if verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EngineError as e:   # the engine's own message (and its log's path) says what went wrong
        if verbose:
            raise
        print(f"error: rollout engine: {e}", file=sys.stderr)
        return 1
    except NonFiniteError as e:
        if verbose:
            raise
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 1
    except OSError as e:   # disk full, read-only filesystem, no permission: where and why, not a traceback
        if verbose or e.errno not in rundir.WRITE_ERRNOS:
            raise
        print(f"error: {rundir.as_write_error(e, e.filename or '.')}", file=sys.stderr)
        return 1
