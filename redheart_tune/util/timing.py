"""Wall-clock seconds of named phases, for the start-up line a trial prints after its first epoch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Adds the wall-clock seconds of the ``with`` block to ``seconds[phase]``, also when it raises."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start
