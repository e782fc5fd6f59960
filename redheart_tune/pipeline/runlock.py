"""One driver at a time per run directory.

Every command that writes a run (sweep, train, all, resume, analyze, crossover, report) holds a lock on
``<run dir>/run.lock`` (``filelock``: an OS lock the kernel drops when the process ends, however it
ends) and writes who holds it beside it, ``run.lock.json``: the run, host, pid, since when, the
command.  A second driver on the same run refuses at once with those.  A driver killed before it could
clean up leaves ``run.lock.json`` behind: the next driver finds the lock free (or, where the lock is
only a file, its holder's pid gone from this host), takes it over and says so; ``status`` says so too.

For a bucket URI the lock is on the driver's local mirror of the run (``tune.config.local_root``): an
object store has no lock to take, so two drivers on different machines, each with its own mirror, are
not kept apart; two on one machine are.

This module imports neither torch nor Ray: a refused command ends before they load.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from redheart_tune.util.files import write_json_atomic

LOCK_FILE = "run.lock"
HOLDER_FILE = "run.lock.json"
WAIT_S = 2.0
"""How long a driver waits for the lock before it refuses (``status`` may hold it for an instant)."""


class RunInUse(RuntimeError):
    """Another driver runs this run now."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a run's lock, as its ``run.lock.json`` says."""

    run: str
    host: str
    pid: int
    since: str
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since} ({self.command})"

    @property
    def here(self) -> bool:
        return self.host == socket.gethostname()


def read_holder(run_dir: Path) -> Holder | None:
    """The holder recorded in ``run_dir`` (None: none, or a record that cannot be read)."""
    try:
        return Holder(**json.loads((Path(run_dir) / HOLDER_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (a zombie, killed and not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def run_lock(run_dir: Path, name: str) -> Iterator[Holder]:
    """Hold run ``name``'s lock (in ``run_dir``) for the block; RunInUse when another driver holds it.
    A holder left by a driver that is gone is taken over, with one line saying so."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=WAIT_S)
    except Timeout:
        lock = _take_over_or_refuse(run_dir, name)
    left = read_holder(run_dir)  # once the lock is ours: a driver that ended well removed its record first
    try:
        if left is not None and left.pid != os.getpid():
            print(
                f"[run] took over run {name!r} from a driver that is gone: {left}; it was killed or died "
                "without releasing it",
                file=sys.stderr,
                flush=True,
            )
        me = Holder(
            run=name,
            host=socket.gethostname(),
            pid=os.getpid(),
            since=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            command=" ".join(["python", Path(sys.argv[0]).name, *sys.argv[1:]]),
        )
        write_json_atomic(run_dir / HOLDER_FILE, vars(me))
        try:
            yield me
        finally:
            (run_dir / HOLDER_FILE).unlink(missing_ok=True)
    finally:
        lock.release()


def _take_over_or_refuse(run_dir: Path, name: str) -> FileLock:
    """The lock is held: refuse, naming the holder, unless the holder is gone from this host; then the
    lock is only a file (a filesystem without OS locks), or a process the driver started still holds
    it, and the lock is taken over."""
    holder = read_holder(run_dir)
    refused = RunInUse(
        f"run {name!r} ({run_dir}) is in use by {holder or 'a driver that is starting'}: one driver at a "
        "time per run. Wait for it to end, or stop it; python run.py status shows where it is"
    )
    if holder is None or not holder.here or pid_alive(holder.pid):
        raise refused
    (run_dir / LOCK_FILE).unlink(missing_ok=True)
    lock = FileLock(run_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise refused from None
    return lock


def lock_line(run_dir: Path) -> str | None:
    """``status``'s line on the run's lock: in use (by whom), left by a driver that is gone, or None when
    no driver holds it."""
    left = read_holder(run_dir)
    if left is None:
        return None
    lock = FileLock(Path(run_dir) / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not left.here or pid_alive(left.pid):
            return f"  driver    running: {left}"
    else:
        lock.release()
    return f"  driver    gone, its lock left behind: {left}; the next command takes it over"
