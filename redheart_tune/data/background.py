"""Encode the held-out set in another process while the trials run, so that ``report`` finds it cached.

    job = start_holdout_encoding(cfg.data, cache_dir)   # None: nothing to do (off, cached, under way)
    ...                                                 # the sweep or the training runs
    print(job.state())                                  # finished, failed (see its log) or still running

The driver starts it once its own data is encoded (``redheart_tune.pipeline.stages``); the child runs
``prepare_holdout`` with one torch thread, at a lower priority (``nice``) and without the GPU (the
trials' memory plans count on the card), and writes its lines to a log in the cache.  The encoding
cache's lock (``redheart_tune.data.encoding_store``) does the rest: a command that needs the held-out set before the
child is done waits for it, and says so, instead of encoding it a second time; a child killed half-way
leaves nothing that is ever read.

A child still running when the driver's command ends goes on until it is done (``report`` waits for
it); an interrupt from the terminal (Ctrl-C) stops it with the driver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import HOLDOUT_LABEL, holdout_uncached, prepare_holdout
from .encoding import encoding_holder
from .errors import DataError

if TYPE_CHECKING:
    from redheart_tune.config import DataConfig


@dataclass
class HoldoutJob:
    """The child process encoding ``count`` held-out texts, and its log."""

    process: subprocess.Popen
    count: int
    log: Path

    def state(self) -> str:
        """One console line: done, failed (where to read why) or still running (a later command waits)."""
        code = self.process.poll()
        if code is None:
            return (
                f"[data] {HOLDOUT_LABEL} is still being encoded in the background (pid {self.process.pid}, "
                f"log {self.log}); a command that needs it waits for it"
            )
        if code != 0:
            return (
                f"[data] the background encoding of {HOLDOUT_LABEL} failed (exit code {code}, log {self.log}); "
                "report encodes it when it needs it"
            )
        return f"[data] {HOLDOUT_LABEL} was encoded in the background: {self.count:,} texts (log {self.log})"


def start_holdout_encoding(cfg: DataConfig, cache_dir: Path) -> HoldoutJob | None:
    """Start encoding the held-out set of ``cfg`` into ``cache_dir`` in a child process, and say so.

    None, without a word, when there is nothing to do: ``data.holdout`` off, no held-out records, all of
    them cached, or the encoder missing (``prepare_holdout`` says what to install when it is needed); None
    with a line when another process is encoding the held-out set already (the sweep's child, when
    ``all`` reaches the training)."""
    cache_dir = Path(cache_dir)
    try:
        count = holdout_uncached(cfg, cache_dir)
    except DataError:
        return None
    if count == 0:  # (a cache carried read-only to another machine has no lock to look at)
        return None
    holder = encoding_holder(encoder=cfg.encoder, max_tokens=cfg.max_tokens, cache_dir=cache_dir)
    if holder and holder.get("label") == HOLDOUT_LABEL:
        print(f"[data] {HOLDOUT_LABEL} is being encoded already, by pid {holder['pid']} on {holder['host']}")
        return None
    log = cache_dir / "encodings" / f"holdout-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # The child finds this package where the driver found it, whatever its working directory.
    top = Path(sys.modules[__name__.partition(".")[0]].__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(top), os.environ.get("PYTHONPATH")) if p),
        "OMP_NUM_THREADS": "1",  # read when torch loads: one core, the trials keep the rest
        "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TQDM_MININTERVAL": "30",  # a progress line in the log every 30 s, not ten a second
    }
    argument = json.dumps({"data": cfg.model_dump(mode="json"), "cache_dir": str(cache_dir)})
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", __name__, argument],
            stdin=subprocess.DEVNULL,
            stdout=out,  # never the driver's pipes: a caller reading them to the end would wait for the child
            stderr=subprocess.STDOUT,
            env=env,
        )
    print(
        f"[data] encoding {HOLDOUT_LABEL} in the background while the trials run: {count:,} texts, not cached "
        f"yet (pid {process.pid}, 1 thread, log {log}); report reads them from the cache"
    )
    return HoldoutJob(process, count, log)


def main(argument: str) -> None:
    """The child: ``prepare_holdout`` of the data settings in ``argument`` (JSON: data, cache_dir)."""
    from redheart_tune.config import DataConfig

    if hasattr(os, "nice"):  # POSIX: the trials come first
        os.nice(10)
    import torch

    torch.set_num_threads(1)
    given = json.loads(argument)
    cfg = DataConfig.model_validate(given["data"])
    started = time.perf_counter()
    held = prepare_holdout(cfg, Path(given["cache_dir"]), show_progress=True)
    took = time.perf_counter() - started
    print(f"[data] {HOLDOUT_LABEL}: {0 if held is None else len(held):,} texts ready in {took:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1])
