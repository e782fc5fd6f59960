"""Sentence encodings with an on-disk cache: token embeddings and pooled vectors per text.

``encode_texts`` encodes only the texts whose sha256 is not cached yet (the encoder: ``data.encoder``)
and writes them, with the cached ones, into a new store (``data.encoding_store``: the layout, and the
lock that makes a second process wait instead of encoding the same texts twice).

With ``show_progress`` a call that encodes says so before it starts (what, how many texts, where they
are cached), gives an estimate once the first batches are timed, and says how long it took.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from .encoder import ENCODER_DIMS as ENCODER_DIMS  # engine.memory sizes a model from it, read here
from .encoder import Estimate, duration, encoder_identity, encoder_identity_if_installed, run_encoder, say
from .encoding_store import (
    LOCK_FILE,
    cached_identity,
    complete_stores,
    encoding_lock,
    lookup,
    open_store,
    read_holder,
    remove_contained,
    sha256s,
    store_root,
    write_store,
)
from .errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Encodings:
    """Encodings of N texts, in the order they were asked for.

    tokens: (N_tokens, E) float16, the store's flat token array (usually a read-only
        mmap; it may hold rows of other texts too).
    token_start, token_length: (N,) int64; text i's tokens are
        ``tokens[token_start[i] : token_start[i] + token_length[i]]``.
    pooled: (N, E) float32 pooled (normalised) sentence vectors.
    encoder: "<package>==<version>" that made them.
    """

    tokens: np.ndarray
    token_start: np.ndarray
    token_length: np.ndarray
    pooled: np.ndarray
    encoder: str


def _identity(encoder: str, max_tokens: int, cache_dir: Path) -> str:
    try:
        return encoder_identity(encoder)
    except DataError:
        # A machine without the encoder (an offline GPU box) can still use encodings carried to it.
        return cached_identity(cache_dir, encoder, max_tokens)


def uncached_count(texts: Sequence[str], *, encoder: str, max_tokens: int, cache_dir: Path) -> int:
    """How many distinct texts of ``texts`` ``encode_texts`` would encode now (0: all cached)."""
    root = store_root(cache_dir, _identity(encoder, max_tokens, cache_dir), max_tokens)
    stores = complete_stores(root)
    have = set() if not stores else set(np.load(stores[0] / "text_sha256.npy").tolist())
    return len(set(sha256s(texts).tolist()) - have)


def encoding_holder(*, encoder: str, max_tokens: int, cache_dir: Path) -> dict | None:
    """Who is encoding into the cache of ``encoder`` at ``max_tokens`` now (pid, host, label, count,
    started, and done_by once estimated), or None when nobody is ({} when the lock is held but its
    holder has not written its record yet)."""
    root = store_root(cache_dir, _identity(encoder, max_tokens, cache_dir), max_tokens)
    if not (root / LOCK_FILE).is_file():
        return None
    lock = FileLock(root / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return read_holder(root)
    lock.release()
    return None


def encode_texts(
    texts: Sequence[str],
    *,
    encoder: str,
    max_tokens: int,
    batch_size: int,
    cache_dir: Path,
    show_progress: bool,
    mmap: bool = True,
    label: str = "new texts",
) -> Encodings:
    """Encodings of ``texts``, computing only those not cached yet under ``cache_dir``.

    encoder: package name (``data.encoder``); max_tokens: tokens kept per text;
    batch_size: texts per encoder call; show_progress: say what is encoded (``label``: what the texts
    are, e.g. "the held-out set for evaluation"), how long it will take and took, with a tqdm bar on
    stderr; mmap: map the token array read-only instead of reading it into memory.
    """
    if not texts:
        raise ValueError("encode_texts needs at least one text")
    identity = _identity(encoder, max_tokens, cache_dir)
    root = store_root(cache_dir, identity, max_tokens)
    keys = sha256s(texts)
    store, missing = lookup(root, keys, texts, mmap)
    if missing and identity != encoder_identity_if_installed(encoder):
        raise DataError(
            f"{len(missing)} of {len(texts)} texts are not in the encoding cache {root}, and the encoder "
            f"{encoder!r} is not installed here: pip install {encoder}, or build the cache where it is "
            "(python run.py prepare <config>) and carry it (data.cache_dir)."
        )
    if missing:
        with encoding_lock(root, label, len(missing), show_progress) as note:
            store, missing = lookup(root, keys, texts, mmap)  # what another process added while this waited
            if missing:
                started = time.perf_counter()
                log.info("%d of %d texts are not in the encoding cache %s", len(missing), len(texts), root)
                if show_progress:
                    say(
                        f"[data] encoding {label}: {len(missing):,} texts, not cached yet; cached in {root} "
                        "for later commands"
                    )

                def estimated(estimate: Estimate) -> None:
                    note(done_by=time.time() + estimate.left)  # for a process that waits for this one
                    if show_progress:
                        say(f"[data] {label}: {estimate}")

                new_tokens, new_pooled = run_encoder(
                    list(missing.values()), encoder, max_tokens, batch_size, show_progress, estimated
                )
                info = {"encoder": identity, "max_tokens": max_tokens}
                new_keys = np.array(list(missing), dtype="S32")
                path = write_store(root, store, new_keys, new_tokens, new_pooled, info)
                store = open_store(path, mmap)
                remove_contained(root, path, store.keys)
                if show_progress:
                    took = duration(time.perf_counter() - started)
                    say(f"[data] encoded {label}: {len(missing):,} texts in {took}")

    assert store is not None  # texts is non-empty, so a store was opened or written
    index = {k: i for i, k in enumerate(store.keys.tolist())}
    rows = np.array([index[k] for k in keys.tolist()], dtype=np.int64)
    starts = store.offsets[rows]
    return Encodings(
        tokens=store.tokens,
        token_start=starts,
        token_length=store.offsets[rows + 1] - starts,
        pooled=np.ascontiguousarray(store.pooled[rows], dtype=np.float32),
        encoder=identity,
    )
