"""The encoding cache on disk: its stores, and the lock that lets one process at a time write them.

Cache layout (one store per encoder version and ``max_tokens``)::

    <cache_dir>/encodings/<encoder>-<version>-t<max_tokens>/store-<count>-<digest>/
        text_sha256.npy   (N,) S32     sha256 of each text (UTF-8), the lookup key
        offsets.npy       (N+1,) int64 text i's tokens are tokens[offsets[i]:offsets[i+1]]
        tokens.npy        (N_tokens, E) float16, ragged, read with numpy mmap
        pooled.npy        (N, E) float32
        info.json         encoder, version, max_tokens, count

A call encodes only texts whose sha256 is not in the store yet, then writes a new
store holding the old rows and the new ones, into a temporary directory that is
renamed into place (a directory rename is atomic, so a reader sees a complete
store or none; the four files must change together, which per-file ``os.replace``
could not give).  Stores the new one contains are then deleted.

One process at a time encodes into a store root: it holds ``.encoding.lock`` there (``filelock``, an
OS lock the kernel drops however the process ends) and writes who it is and what it encodes beside it,
``.encoding.json``.  A second process that needs texts waits, says for whom, then looks again: what
the first one added is not encoded twice.  A writer killed mid-store leaves only a ``.tmp-store-*``
directory, which no reader opens and the next lock holder deletes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from redheart_tune.util.files import write_json_atomic

from .encoder import duration, encoder_identity, say
from .errors import DataError

_COPY_ROWS = 1 << 16
"""Token rows copied per step when an old store is carried into a new one (bounds memory)."""

LOCK_FILE = ".encoding.lock"
HOLDER_FILE = ".encoding.json"


def cached_identity(cache_dir: Path, encoder: str, max_tokens: int) -> str:
    """The identity of the encodings cached for ``encoder`` at ``max_tokens`` when the package is missing;
    the not-installed error when there are none, or several versions to choose from."""
    found = {
        json.loads((store / "info.json").read_text())["encoder"]
        for root in (cache_dir / "encodings").glob(f"{encoder}-*-t{max_tokens}")
        for store in complete_stores(root)
        if (store / "info.json").is_file()
    }
    if len(found) != 1:
        encoder_identity(encoder)  # raises: not installed, pip install it
        raise DataError(f"encodings of several versions of {encoder} in {cache_dir}: {sorted(found)}")
    return found.pop()


def sha256s(texts: Sequence[str]) -> np.ndarray:
    return np.array([hashlib.sha256(t.encode("utf-8")).digest() for t in texts], dtype="S32")


def store_root(cache_dir: Path, identity: str, max_tokens: int) -> Path:
    return cache_dir / "encodings" / f"{identity.replace('==', '-')}-t{max_tokens}"


def complete_stores(root: Path) -> list[Path]:
    """Complete stores under ``root``, largest first (temporary directories start with '.')."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("store-")]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


@dataclass(frozen=True, eq=False)
class Store:
    path: Path
    keys: np.ndarray  # (N,) S32
    offsets: np.ndarray  # (N+1,) int64
    tokens: np.ndarray  # (N_tokens, E) float16
    pooled: np.ndarray  # (N, E) float32


def open_store(path: Path, mmap: bool) -> Store:
    mode = "r" if mmap else None
    try:
        return Store(
            path=path,
            keys=np.load(path / "text_sha256.npy"),
            offsets=np.load(path / "offsets.npy"),
            tokens=np.load(path / "tokens.npy", mmap_mode=mode),
            pooled=np.load(path / "pooled.npy", mmap_mode=mode),
        )
    except (OSError, ValueError) as e:
        raise DataError(
            f"encoding cache {path} is unreadable ({e}). Delete that directory and start again."
        ) from e


def write_store(
    root: Path, old: Store | None, keys: np.ndarray, tokens: list[np.ndarray], pooled: np.ndarray, info: dict
) -> Path:
    """A new store = ``old``'s rows followed by the new ones, renamed into place."""
    old_n = 0 if old is None else len(old.keys)
    old_tokens = 0 if old is None else int(old.offsets[-1])
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    all_keys = keys if old is None else np.concatenate([old.keys, keys])
    base = np.zeros(1, dtype=np.int64) if old is None else old.offsets
    offsets = np.concatenate([base, old_tokens + np.cumsum(lengths)])
    dim = pooled.shape[1]
    digest = hashlib.sha256(all_keys.tobytes()).hexdigest()[:16]
    final = root / f"store-{len(all_keys):08d}-{digest}"
    if final.is_dir():  # another process wrote the same store
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-store-", dir=root))
    try:
        np.save(tmp / "text_sha256.npy", all_keys)
        np.save(tmp / "offsets.npy", offsets.astype(np.int64))
        flat = np.lib.format.open_memmap(
            tmp / "tokens.npy", mode="w+", dtype=np.float16, shape=(int(offsets[-1]), dim)
        )
        if old is not None:
            for s in range(0, old_tokens, _COPY_ROWS):
                e = min(s + _COPY_ROWS, old_tokens)
                flat[s:e] = old.tokens[s:e]
        position = old_tokens
        for t in tokens:
            flat[position : position + len(t)] = t
            position += len(t)
        flat.flush()
        del flat
        all_pooled = pooled if old is None else np.concatenate([np.asarray(old.pooled), pooled])
        np.save(tmp / "pooled.npy", all_pooled.astype(np.float32))
        (tmp / "info.json").write_text(
            json.dumps({**info, "count": len(all_keys), "old_count": old_n}, indent=2)
        )
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not "another process won the race"
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def remove_contained(root: Path, newest: Path, keys: np.ndarray) -> None:
    """Delete the stores whose every text is in ``newest`` (which has ``keys``)."""
    have = set(keys.tolist())
    for path in complete_stores(root):
        if path == newest:
            continue
        try:
            contained = set(np.load(path / "text_sha256.npy").tolist()) <= have
        except (OSError, ValueError):
            continue  # being written or removed by another process: leave it to that one
        if contained:
            # ignore_errors: another process may be deleting it too, or (Windows) still
            # have it mapped; a leftover store costs disk, not correctness.
            shutil.rmtree(path, ignore_errors=True)


def lookup(
    root: Path, keys: np.ndarray, texts: Sequence[str], mmap: bool
) -> tuple[Store | None, dict[bytes, str]]:
    """The newest store under ``root`` (None: none yet) and the texts it lacks, by key, each once."""
    stores = complete_stores(root)
    store = open_store(stores[0], mmap) if stores else None
    have = set() if store is None else set(store.keys.tolist())
    missing: dict[bytes, str] = {}
    for key, text in zip(keys.tolist(), texts, strict=True):
        if key not in have and key not in missing:
            missing[key] = text
    return store, missing


def read_holder(root: Path) -> dict:
    try:
        return json.loads((root / HOLDER_FILE).read_text())
    except (OSError, ValueError):
        return {}  # gone (its holder just finished) or being replaced


def _waiting_line(root: Path) -> str:
    holder = read_holder(root)
    if not holder:
        return f"[data] waiting for another process that is encoding into {root} ({LOCK_FILE} is held)"
    since = time.strftime("%H:%M:%S", time.localtime(holder["started"]))
    line = (
        f"[data] waiting for pid {holder['pid']} on {holder['host']}, which has been encoding {holder['label']} "
        f"({holder['count']:,} texts) into {root} since {since}"
    )
    if holder.get("done_by"):
        line += f"; about {duration(max(0.0, holder['done_by'] - time.time()))} left by its estimate"
    return line


def _remove_temporaries(root: Path) -> None:
    """Delete the partial stores of writers that were killed: only the lock holder writes a store, and
    this process holds the lock now."""
    for tmp in root.glob(".tmp-store-*"):
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def encoding_lock(root: Path, label: str, count: int, show_progress: bool) -> Iterator[Callable[..., None]]:
    """Hold ``root``'s encoding lock, waiting (and saying for whom) while another process holds it.
    Yields ``note(**fields)``, which adds fields to this holder's ``.encoding.json`` (its estimate)."""
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if show_progress:
            say(_waiting_line(root))
        waited = time.perf_counter()
        lock.acquire()
        if show_progress:
            say(f"[data] waited {duration(time.perf_counter() - waited)}; looking at the cache again")
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "label": label,
        "count": count,
        "started": time.time(),
    }

    def note(**fields) -> None:
        holder.update(fields)
        write_json_atomic(root / HOLDER_FILE, holder)

    try:
        _remove_temporaries(root)
        note()
        yield note
    finally:
        (root / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()
