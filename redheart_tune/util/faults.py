"""Faults a long run will meet that retrying cannot fix: a full disk, a quota, a read-only filesystem.

Tune's FailureConfig restarts a failed trial from its newest checkpoint (``resources.max_failures``); that
is right for a dead worker or node, and wrong for a disk that is still full: the restart loads the model,
trains an epoch and fails at the same write.  So a trial that meets one of these errors

- writes nothing more and reports one record, ``{FAULT: "<one line>"}``, instead of raising;
- the driver's ``FaultStop`` callback, which sees that report before Tune's own loggers (that would
  write to the same disk), stops the experiment at once with ``OutOfSpaceError``: the path, the free
  space there, the size of one checkpoint of this model, and the command that continues the run.

Tune's record of the experiment keeps the trial as RUNNING, so ``python run.py resume`` continues it
from its newest checkpoint once space is freed.

    out_of_space(exc)                        is it ENOSPC / EDQUOT / EROFS (anywhere in its chain)?
    checkpoint_sizes(model)                  bytes of one checkpoint: weights, resume state
    space_line(exc, directory, sizes)        the one line a trial reports
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ray.tune import Callback

OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
"""The errnos a retry would only meet again: no space, quota exceeded, read-only filesystem."""
FAULT = "redheart_fault"
"""The key of the one report a trial makes when it stops on such an error (its value: the line to show)."""


class OutOfSpaceError(RuntimeError):
    """A write failed for lack of space (or a read-only filesystem); the message is the one line to show."""


def out_of_space(exc: BaseException | None) -> OSError | None:
    """The OSError with ENOSPC, EDQUOT or EROFS in ``exc`` or its causes, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in OUT_OF_SPACE:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def checkpoint_sizes(model) -> tuple[int, int]:
    """Bytes of one checkpoint of ``model``: its weights as saved (every state-dict tensor at its own
    dtype), and its resume state (AdamW's two fp32 moments per trainable parameter; the RNGs and the
    schedule are a few kB)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    resume = 2 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    return weights, resume


def human_bytes(n: float) -> str:
    """Decimal units, as ``df -H`` and disk vendors count: 2.9 GB, 310.4 MB, 12.0 kB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def free_bytes(path: Path) -> int:
    """Free bytes (for an unprivileged user) on the filesystem of ``path``, or of its nearest existing parent."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def space_line(exc: OSError, directory: Path, sizes: tuple[int, int] | None) -> str:
    """One line: what failed where, the free space there, and what one checkpoint of this model needs."""
    where = Path(exc.filename) if exc.filename else Path(directory)
    line = f"{os.strerror(exc.errno)} ({errno.errorcode[exc.errno]}) writing {where}: "
    line += f"{human_bytes(free_bytes(where))} free there"
    if sizes is not None:
        weights, resume = sizes
        line += (
            f"; one checkpoint of this model takes {human_bytes(weights)} of weights "
            f"+ {human_bytes(resume)} of resume state"
        )
    return line


class FaultStop(Callback):
    """Stops the experiment at once when a trial reports a FAULT, before any other callback (Tune's own
    loggers included) writes the report to the disk that failed.

    Tune wraps a callback's exception into a TuneError holding only its traceback's text, so the line is
    also kept here, for ``take_fault`` (``tune.runner.fit`` shows it as one line)."""

    reported: str | None = None  # class-wide: a restored Tuner unpickles its own instance

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if FAULT in result:
            FaultStop.reported = result[FAULT]
            raise OutOfSpaceError(result[FAULT])


def take_fault() -> str | None:
    """The line of the fault that stopped the last experiment in this process (then forgotten)."""
    line, FaultStop.reported = FaultStop.reported, None
    return line
