"""What Ray writes on the driver's console: plain text in a log file, one line per checkpoint, no traceback
from a worker's shutdown.  This module imports no Ray.

``plain_ray_output`` runs in the driver before Ray is imported (Ray reads RAY_DEDUP_LOGS at import):
without a terminal, the ``(run_trial pid=...)`` prefix of the trials' forwarded lines comes without
colour codes (``RAY_COLOR_PREFIX=0``, read by Ray's ``print_worker_logs``), and no line is folded into
a green ``[repeated 2x across cluster]``.  ``quiet_trial`` runs in each trial's worker.
"""

from __future__ import annotations

import logging
import os
import sys

_python_hook = sys.__unraisablehook__

RAY_CHECKPOINT_LOGGERS = ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage")
"""Where Ray logs ``Checkpoint successfully created at: Checkpoint(...)`` at INFO, in the trial's worker;
the driver's epoch line already says ``[checkpoint]``."""


def plain_ray_output() -> None:
    """Before Ray is imported, in the driver: no colour codes unless both outputs are terminals, and
    every forwarded line as it was written (a value set by the user stays)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def quiet_trial() -> None:
    """In a trial's worker: Ray's own line per checkpoint left out, and no ``Exception ignored in: ...
    SystemExit: 1`` traceback when Ray stops the worker with SIGTERM while Python runs a finalizer (a
    WeakSet's callback): Ray's handler raises SystemExit there, Python can only print and drop it, and
    the print reached the driver's console after a successful run."""
    global _python_hook
    for name in RAY_CHECKPOINT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if sys.unraisablehook is not _drop_exit:
        _python_hook, sys.unraisablehook = sys.unraisablehook, _drop_exit


def _drop_exit(unraisable) -> None:
    """sys.unraisablehook: a SystemExit raised where Python cannot raise it (the worker is exiting anyway)
    is dropped; anything else is printed as Python prints it."""
    if not isinstance(unraisable.exc_value, SystemExit):
        _python_hook(unraisable)
