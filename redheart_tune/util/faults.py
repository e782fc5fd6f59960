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

Better still, the space is checked before it runs out (``SpaceCheck``).  A training trial says at its
start, in one line, when the free space will not hold its remaining checkpoints, and before each
checkpoint it compares the free space with that checkpoint's size: when it cannot fit, the trial writes
nothing and stops the same way, with a ``NoRoomError`` (an ENOSPC raised before the write).

    out_of_space(exc)                        is it ENOSPC / EDQUOT / EROFS (anywhere in its chain)?
    checkpoint_sizes(model)                  bytes of one checkpoint: weights, resume state
    space_line(exc, directory, sizes)        the one line a trial reports
    free_bytes(path)                         the free space there: every check reads it through this seam
    SpaceCheck(size, staging, destination, keep_resume)
        .start_line(epochs, held)            the warning when the checkpoints of ``epochs`` will not all fit
        .before_write(epoch)                 raise NoRoomError when this checkpoint cannot fit
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
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
    return shutil.disk_usage(_existing(path)).free


def _existing(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def space_line(exc: OSError, directory: Path, sizes: tuple[int, int] | None) -> str:
    """One line: what failed where, the free space there, and what one checkpoint of this model needs."""
    if isinstance(exc, NoRoomError):  # stopped before the write: the check wrote its own line
        return exc.strerror
    where = Path(exc.filename) if exc.filename else Path(directory)
    line = f"{os.strerror(exc.errno)} ({errno.errorcode[exc.errno]}) writing {where}: "
    line += f"{human_bytes(free_bytes(where))} free there"
    inodes = os.statvfs(_existing(where))
    if inodes.f_files and not inodes.f_favail:  # a filesystem that counts its files has room for no more
        line += " but no free inodes (df -i)"
    if sizes is not None:
        line += "; " + _one_checkpoint(*sizes)
    return line


def _one_checkpoint(weights: int, resume: int) -> str:
    return f"one checkpoint of this model takes {human_bytes(weights)} of weights + {human_bytes(resume)} of resume state"


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


# ---------------------------------------------------------------------------
# Space checked before it runs out

RESUME_STATES_KEPT = 2
"""While training, the newest two checkpoints keep their resume state (``train.keep_resume_state: latest``;
``tune.callbacks.ResumeStatePruner`` drops the older ones' after each new checkpoint is stored)."""
ESTIMATE_SLACK = 0.05
"""An estimate from the parameters leaves out torch.save's framing, AdamW's step counters, the RNG states
and metrics.json: 2.7% of the smoke model's checkpoint, less for larger ones."""


@dataclass(frozen=True)
class CheckpointSize:
    """Bytes of one checkpoint: ``total`` (every file), ``weights`` and ``resume`` (its resume state), and
    where the numbers come from (``source``)."""

    weights: int
    resume: int
    total: int
    source: str

    @classmethod
    def estimate(cls, model) -> CheckpointSize:
        """From the model's parameters (``checkpoint_sizes``), before any checkpoint of it was written."""
        weights, resume = checkpoint_sizes(model)
        total = int((weights + resume) * (1 + ESTIMATE_SLACK))
        return cls(weights, resume, total, f"estimated from the model's parameters, +{ESTIMATE_SLACK:.0%}")

    def line(self) -> str:
        return f"{_one_checkpoint(self.weights, self.resume)} ({self.source})"


class NoRoomError(OSError):
    """A checkpoint that cannot fit, found before writing it: errno ENOSPC, so the trial stops as on a full
    disk (``tune.trainable.run_trial``); ``strerror`` is the one line to show."""

    def __init__(self, line: str, where: Path):
        super().__init__(errno.ENOSPC, line, str(where))


def same_filesystem(a: Path, b: Path) -> bool:
    return os.stat(_existing(a)).st_dev == os.stat(_existing(b)).st_dev


@dataclass
class SpaceCheck:
    """Where a training trial's checkpoints go, and whether they fit.

    A checkpoint is written to ``staging`` (a local temporary folder), then Tune copies it to
    ``destination`` (the trial's folder) and the staged copy is removed.  On remote storage
    ``destination`` is None: the free space of a bucket is unknown, only the staging folder is checked.
    ``keep_resume``: how many newest checkpoints keep their resume state (None: all).  ``size``: an estimate
    until a checkpoint was written, then the newest one's measured size (``tune.trainable`` sets it)."""

    size: CheckpointSize
    staging: Path
    destination: Path | None
    keep_resume: int | None

    def places(self) -> list[tuple[Path, int]]:
        """Each local filesystem a checkpoint lands on, with the copies of it there at once."""
        if self.destination is None:
            return [(self.staging, 1)]
        if same_filesystem(self.staging, self.destination):
            return [(self.destination, 2)]  # the staged copy and Tune's, until the staged one is removed
        return [(self.staging, 1), (self.destination, 1)]

    def fitting(self, count: int, held: int) -> tuple[int, Path, int]:
        """How many of ``count`` checkpoints, written in turn, fit in today's free space; the place that
        runs out first (else the destination) and its free space now.  ``held``: the resume states already
        in the trial's folder (a resumed trial's); the driver prunes them to ``keep_resume``."""
        places = self.places()
        free = {where: free_bytes(where) for where, _ in places}
        left = dict(free)
        for n in range(count):
            for where, copies in places:
                if left[where] < copies * self.size.total:
                    return n, where, free[where]
            if self.destination is not None:  # the staged copy is removed; Tune's stays
                left[self.destination] -= self.size.total
                held += 1
                if self.keep_resume is not None and held > self.keep_resume:
                    left[self.destination] += (held - self.keep_resume) * self.size.resume
                    held = self.keep_resume
        where = places[-1][0]
        return count, where, free[where]

    def start_line(self, epochs: list[int], held: int) -> str | None:
        """The one-line warning for a trial whose checkpoints of ``epochs`` will not all fit; None when
        they will.  ``held`` as in ``fitting``."""
        n, where, free = self.fitting(len(epochs), held)
        if n == len(epochs):
            return None
        return (
            f"[space] only {n} of the {len(epochs)} remaining checkpoints will fit in {where}: "
            f"{human_bytes(free)} free there; {self.size.line()}. "
            f"Free space before epoch {epochs[n]}'s checkpoint, or the run stops there."
        )

    def before_write(self, epoch: int) -> None:
        """Raise NoRoomError when the checkpoint of ``epoch`` cannot fit now; nothing of it is written."""
        for where, copies in self.places():
            free = free_bytes(where)
            if free < copies * self.size.total:
                need = human_bytes(copies * self.size.total)
                if copies > 1:
                    need += f" (the staged copy from {self.staging} and Tune's, at once)"
                raise NoRoomError(
                    f"Not enough space for epoch {epoch}'s checkpoint in {where}: "
                    f"{human_bytes(free)} free there, {need} needed; {self.size.line()}",
                    where,
                )


def local_trial_dir() -> Path | None:
    """Inside a Tune trial: its folder in the experiment when that is on a local filesystem; None on
    remote storage (a bucket has no free space to read)."""
    import pyarrow.fs
    from ray.tune import get_context

    storage = get_context().get_storage()
    if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return Path(storage.trial_fs_path)
    return None
