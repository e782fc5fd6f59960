"""Data for the Red Heart model: load, validate, sample, encode (cached), split, batch.

    data = prepare_data(cfg.data, cache_dir)           # EncodedData, fast when cached
    for batch in iterate_batches(data, "train", 4, shuffle=True, generator=g):
        batch = batch.to(device)                       # Batch: tokens (B, T, E), mask, pooled, targets
    holdout = prepare_holdout(cfg.data, cache_dir)     # the second held-out set, for evaluation only

Two sources (``data.source``):

- ``vader`` (default): the VADER sentiment ground truth, fetched once from the
  ``vaderSentiment==3.3.2`` sdist; its task mapping is in ``tune.data.vader``.
- ``redheart``: the user's Red Heart JSON records at ``data.path``; format and
  validation in ``tune.data.redheart``.

Nothing here runs at import time: downloads, directories and the encoder are all
made or loaded inside ``prepare_data``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from redheart_tune.model.tasks import TaskSpec

from . import redheart, vader, vader_download
from .dataset import (
    HOLDOUT,
    SPLITS,
    Batch,
    EncodedData,
    concat_batches,
    content_digest,
    holdout_rows,
    iterate_batches,
    make_batch,
    normalise_text,
    num_batches,
    sample_and_split,
    split_fingerprint,
)
from .encoding import encode_texts, uncached_count
from .errors import DataError
from .raw import LoadReport, RawData

if TYPE_CHECKING:  # tune.config imports the model package; data needs it for annotations only
    from redheart_tune.config import DataConfig

__all__ = [
    "HOLDOUT",
    "SPLITS",
    "Batch",
    "DataError",
    "EncodedData",
    "LoadReport",
    "HOLDOUT_LABEL",
    "concat_batches",
    "iterate_batches",
    "make_batch",
    "normalise_text",
    "num_batches",
    "prepare_data",
    "holdout_uncached",
    "prepare_holdout",
    "task_specs",
]

log = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("vader", "redheart")


def task_specs(source: str) -> dict[str, TaskSpec]:
    """The four task descriptions of ``source``, without loading any data."""
    if source == "vader":
        return vader.task_specs()
    if source == "redheart":
        return redheart.task_specs()
    raise DataError(f"data.source must be one of {SOURCES}, got {source!r}")


def _load_source(cfg: DataConfig, cache_dir: Path) -> tuple[RawData, LoadReport | None]:
    if cfg.source == "vader":
        if cfg.path is not None:
            raise DataError(f"data.path must be empty for data.source=vader (got {cfg.path!r}); remove it.")
        return vader.load_vader(vader_download.fetch_vader(cache_dir)), None
    if cfg.source == "redheart":
        if cfg.path is None:
            raise DataError("data.source=redheart needs data.path: set it to your Red Heart JSON file.")
        return redheart.load_redheart(Path(cfg.path), cfg.on_bad_record)
    raise DataError(f"data.source must be one of {SOURCES}, got {cfg.source!r}")


DATA_LABEL = "the train, validation and test texts"
"""What the console calls the training data while it is encoded."""


def prepare_data(cfg: DataConfig, cache_dir: Path, *, show_progress: bool = True) -> EncodedData:
    """Load, validate, sample, encode and split the data that ``cfg`` describes.

    cfg: the ``data`` section (``tune.config.DataConfig``).
    cache_dir: the resolved cache directory (``data.cache_dir``, or
        ``<run.output_root>/cache`` when that is null; the caller decides): the
        VADER download and the encodings live under it.
    show_progress: a tqdm bar on stderr while encoding.

    Only the sampled texts are encoded, and only those not in the cache yet, so a
    second call with the same settings reads everything from disk (about a second
    for VADER).  Raises ``DataError`` for anything wrong with the data or its fetch.
    The second held-out set is not part of it (``prepare_holdout``).
    """
    cache_dir = Path(cache_dir)
    raw, report, kept, splits = _drawn(cfg, cache_dir)
    # Everything that changes what the model sees goes into the fingerprint (see split_fingerprint).
    params = {
        "source": cfg.source,
        "records_available": len(raw),
        "max_samples": cfg.max_samples,
        "split_seed": cfg.split_seed,
        "shares": [float(s) for s in cfg.split],
        "stratified_by": "corpus" if raw.strata is not None else None,
    }
    return _encoded(raw.take(kept), splits, params, cfg, cache_dir, show_progress, report, DATA_LABEL)


def _drawn(cfg: DataConfig, cache_dir: Path) -> tuple[RawData, LoadReport | None, np.ndarray, dict]:
    """The whole source, its load report, and the ``data.max_samples`` draw: the kept rows and their split."""
    raw, report = _load_source(cfg, cache_dir)
    shares = tuple(float(s) for s in cfg.split)
    kept, splits = sample_and_split(len(raw), raw.strata, cfg.max_samples, shares, cfg.split_seed)
    return raw, report, kept, splits


HOLDOUT_LABEL = "the held-out set for evaluation"
"""What the console calls the second held-out set while it is encoded."""


def prepare_holdout(cfg: DataConfig, cache_dir: Path, *, show_progress: bool = True) -> EncodedData | None:
    """The second held-out set (``data.holdout``): one split, "holdout", of the records outside the
    ``data.max_samples`` draw whose normalised text is in no train, validation or test record
    (``tune.data.dataset.holdout_rows``).  None when ``data.holdout`` is off or the draw kept every record.

    It is its own ``EncodedData`` with its own fingerprint: training never reads it, so the training
    data's fingerprint (and every checkpoint made with it) does not depend on it.  Its texts are encoded
    into the same cache as the training data's (once; a later call reads them from disk; with
    ``show_progress`` the first says so, with its size and an estimate).  ``redheart_tune.data.background``
    encodes it in another process while the trials run.
    """
    found = _holdout(cfg, Path(cache_dir))
    if found is None:
        return None
    raw, params, report = found
    splits = {HOLDOUT: np.arange(len(raw), dtype=np.int64)}
    return _encoded(raw, splits, params, cfg, Path(cache_dir), show_progress, report, HOLDOUT_LABEL)


def holdout_uncached(cfg: DataConfig, cache_dir: Path) -> int:
    """How many texts of the held-out set ``prepare_holdout`` would encode now: 0 when they are all
    cached, or when there is no held-out set."""
    found = _holdout(cfg, Path(cache_dir))
    if found is None:
        return 0
    texts = found[0].texts
    return uncached_count(texts, encoder=cfg.encoder, max_tokens=cfg.max_tokens, cache_dir=Path(cache_dir))


def _holdout(cfg: DataConfig, cache_dir: Path) -> tuple[RawData, dict, LoadReport | None] | None:
    """The held-out set's rows, its fingerprint's parameters and the source's load report; None for none."""
    if not cfg.holdout:
        return None
    raw, report, kept, _ = _drawn(cfg, cache_dir)
    rows = holdout_rows(raw.texts, kept, cfg.split_seed, cfg.holdout_max_samples)
    if len(rows) == 0:
        return None
    params = {
        "source": cfg.source,
        "records_available": len(raw),
        "max_samples": cfg.max_samples,
        "split_seed": cfg.split_seed,
        "holdout_of": len(raw) - len(kept),
        "holdout_max_samples": cfg.holdout_max_samples,
        "deduplicated_by": "normalise_text",
    }
    return raw.take(rows), params, report


def _encoded(
    raw: RawData,
    splits: dict[str, np.ndarray],
    params: dict,
    cfg: DataConfig,
    cache_dir: Path,
    show_progress: bool,
    report: LoadReport | None,
    label: str,
) -> EncodedData:
    """``raw``'s rows encoded (cached), with ``splits`` and a fingerprint over them, ``params``, the encoder,
    ``max_tokens`` and a digest of every text and target."""
    encodings = encode_texts(
        raw.texts,
        encoder=cfg.encoder,
        max_tokens=cfg.max_tokens,
        batch_size=cfg.encode_batch_size,
        cache_dir=cache_dir,
        show_progress=show_progress,
        label=label,
    )
    params = {
        **params,
        "encoder": encodings.encoder,
        "max_tokens": cfg.max_tokens,
        "content_sha256": content_digest(raw.texts, raw.targets, raw.target_mask),
    }
    data = EncodedData(
        tokens=encodings.tokens,
        token_start=encodings.token_start,
        token_length=encodings.token_length,
        pooled=encodings.pooled,
        targets=raw.targets,
        target_mask=raw.target_mask,
        ids=raw.ids,
        texts=raw.texts,
        tasks=raw.tasks,
        splits=splits,
        split_params=params,
        fingerprint=split_fingerprint(raw.ids, splits, params),
        encoder=encodings.encoder,
        max_tokens=cfg.max_tokens,
        load_report=report,
    )
    log.info("%r", data)
    return data
