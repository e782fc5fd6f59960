"""``EncodedData`` (encoded texts, targets, splits) and batching over it.

Batches are built straight from numpy arrays (possibly memory-mapped), without a
``DataLoader``: the data is already encoded, a batch is a gather and a pad, and the
shuffle order then comes from one ``torch.Generator`` that the trainer owns, saves
and restores (exact resume).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from redheart_tune.model.tasks import TaskSpec

from .errors import DataError
from .raw import LoadReport

SPLITS: tuple[str, ...] = ("train", "val", "test")
HOLDOUT = "holdout"
"""The split name of the second held-out set (``holdout_rows``): its own ``EncodedData``, never in ``SPLITS``."""


# ----------------------------------------------------------------------------- sample and split


def _allocate(n: int, shares: tuple[float, ...], at_least_one: bool) -> list[int]:
    """Split ``n`` into counts proportional to ``shares`` (largest remainder, ties to the earlier split).

    at_least_one: every split with a positive share gets one row if ``n`` allows it,
    taken from the largest split, so a tiny data set still has a validation row.
    """
    exact = [n * s for s in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    if at_least_one:
        for i, share in enumerate(shares):
            largest = max(range(len(counts)), key=lambda j: counts[j])
            if share > 0 and counts[i] == 0 and counts[largest] > 1:
                counts[i] += 1
                counts[largest] -= 1
    return counts


def draw_order(n: int, seed: int) -> np.ndarray:
    """The seeded permutation of ``n`` rows that decides the sample cap, the split and the held-out set."""
    return np.random.default_rng(seed).permutation(n)


def sample_and_split(
    n: int, strata: np.ndarray | None, max_samples: int | None, shares: tuple[float, ...], seed: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rows to keep and the train/val/test split, reproducibly from ``seed``.

    One seeded permutation of all ``n`` rows decides both: the first ``max_samples``
    rows of it are kept (so a larger cap with the same seed keeps a superset, and
    only the added texts need encoding), and walking the kept rows in that order,
    each stratum (all rows one stratum when ``strata`` is None) gives its first
    rows to train, the next to val, the rest to test, in proportion to ``shares``.

    Returns (kept, splits): ``kept`` (K,) sorted indices into the n rows; ``splits``
    maps "train" / "val" / "test" to sorted indices into ``kept``.
    """
    if n == 0:
        raise DataError("no records to sample from")
    if max_samples is not None and max_samples < 1:
        raise DataError(f"data.max_samples must be at least 1 or null, got {max_samples}")
    if len(shares) != len(SPLITS) or min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6:
        raise DataError(f"data.split must be three non-negative shares summing to 1, got {shares}")
    order = draw_order(n, seed)
    kept_in_order = order if max_samples is None else order[:max_samples]
    kept = np.sort(kept_in_order)
    position = np.searchsorted(kept, kept_in_order)  # index into kept, in permutation order
    groups = np.zeros(len(kept_in_order), dtype=np.int64) if strata is None else strata[kept_in_order]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for group in np.unique(groups):
        members = position[groups == group]  # permutation order
        counts = _allocate(len(members), shares, at_least_one=strata is None)
        bounds = np.cumsum([0, *counts])
        for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
            parts[name].append(members[lo:hi])
    splits = {name: np.sort(np.concatenate(p)).astype(np.int64) for name, p in parts.items()}
    empty = [name for name, share in zip(SPLITS, shares, strict=True) if share > 0 and len(splits[name]) == 0]
    if empty:
        raise DataError(
            f"{len(kept)} records are too few for data.split={shares}: {empty} would be empty. "
            "Raise data.max_samples or provide more records."
        )
    return kept, splits


def normalise_text(text: str) -> str:
    """The key under which two texts count as the same sentence: NFKC, case-folded, and every run of
    characters that are not letters or digits (punctuation, emoticons, whitespace) one space.

    VADER repeats sentences with only their case and punctuation changed ("Yay. Another good phone
    interview." to "YAY!!! Another good phone interview!!!", six rated variants of one sentence), and
    the encoder is uncased: such variants are near-identical inputs, so they must not sit on both sides
    of a held-out boundary.  Texts made only of symbols share the key "" (conservative: a few more
    sentences are kept out of the held-out set than strictly needed).
    """
    return re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


def holdout_rows(texts: Sequence[str], kept: np.ndarray, seed: int, limit: int | None) -> np.ndarray:
    """The second held-out set: rows outside the drawn sample ``kept`` (``sample_and_split``'s), whose
    ``normalise_text`` key is the key of no kept row (train, val or test) and of no earlier held-out row.

    Rows are taken in the order of the same seeded permutation (``draw_order(len(texts), seed)``), so
    ``limit`` (at most that many; None: all) keeps a reproducible prefix.  Returns sorted row indices
    into ``texts``; empty when the draw kept every row.
    """
    inside = set(np.asarray(kept).tolist())
    taken = {normalise_text(texts[i]) for i in inside}
    rows: list[int] = []
    for i in draw_order(len(texts), seed).tolist():
        if limit is not None and len(rows) >= limit:
            break
        if i in inside:
            continue
        key = normalise_text(texts[i])
        if key not in taken:
            taken.add(key)
            rows.append(i)
    return np.sort(np.asarray(rows, dtype=np.int64))


def content_digest(
    texts: tuple[str, ...], targets: dict[str, np.ndarray], masks: dict[str, np.ndarray]
) -> str:
    """sha256 over every text (in row order) and every target and mask array: a changed label or text changes it."""
    digest = hashlib.sha256(json.dumps(list(texts)).encode("utf-8"))
    for name in sorted(targets):
        for kind, array in (("target", targets[name]), ("mask", masks[name])):
            a = np.ascontiguousarray(array)
            digest.update(f"{kind}/{name}:{a.dtype.str}:{a.shape}".encode())
            digest.update(a.tobytes())
    return digest.hexdigest()


def split_fingerprint(ids: tuple[str, ...], splits: dict[str, np.ndarray], params: dict[str, Any]) -> str:
    """sha256 over the ids of each split and the split parameters.

    ``prepare_data``'s parameters name everything else that changes what a model
    sees: the encoder's identity and ``max_tokens`` (the encoded inputs) and a
    ``content_digest`` of the texts and targets.
    """
    payload = {"params": params, "splits": {name: [ids[i] for i in rows] for name, rows in splits.items()}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True, eq=False)
class EncodedData:
    """Encoded texts, their targets and their split.  N rows.

    tokens: (N_tokens, E) float16 flat token embeddings (usually a read-only mmap of
        the encoding cache, which may also hold rows of other texts).
    token_start, token_length: (N,) int64; row i's tokens are
        ``tokens[token_start[i] : token_start[i] + token_length[i]]`` (1..max_tokens).
    pooled: (N, E) float32 pooled, normalised sentence vectors.
    targets: per task, (N, C) float32 (soft_classification), (N,) int64
        (classification) or (N, dim) float32 (regression).
    target_mask: per task, (N,) bool, True where the row has that target.
    ids: (N,) record ids; texts: the encoded texts, or None.
    tasks: the task descriptions the targets follow.
    splits: "train" / "val" / "test" -> sorted (n_split,) int64 row indices.
    split_params: source, records available, sample cap, seed and shares that made the split, and the
        encoder, max_tokens and content digest (texts and targets) of the rows.
    fingerprint: sha256 over the ids of each split and ``split_params``: any change to the data the
        model sees changes it.
    encoder: "<package>==<version>" that made the encodings; max_tokens: its cut.
    load_report: what loading a record file kept and skipped (redheart), else None.
    """

    tokens: np.ndarray
    token_start: np.ndarray
    token_length: np.ndarray
    pooled: np.ndarray
    targets: dict[str, np.ndarray]
    target_mask: dict[str, np.ndarray]
    ids: tuple[str, ...]
    texts: tuple[str, ...] | None
    tasks: dict[str, TaskSpec]
    splits: dict[str, np.ndarray]
    split_params: dict[str, Any]
    fingerprint: str
    encoder: str
    max_tokens: int
    load_report: LoadReport | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def input_dim(self) -> int:
        """E: width of the token embeddings and the pooled vector."""
        return int(self.pooled.shape[1])

    def compacted(self) -> EncodedData:
        """This data with its own token rows only, in one array: ``tokens`` is usually a memory map of the
        whole encoding cache, which may hold other texts; this copy is what travels to a cluster's
        workers through Ray's object store (they may not share the cache's filesystem)."""
        tokens = np.concatenate(
            [self.tokens[s : s + n] for s, n in zip(self.token_start, self.token_length, strict=True)]
        )
        starts = np.concatenate([[0], np.cumsum(self.token_length)[:-1]]).astype(np.int64)
        return dataclasses.replace(self, tokens=tokens, token_start=starts)

    def split_record(self) -> dict[str, Any]:
        """The split as JSON-ready data, for the trainer to save beside its checkpoints."""
        return {
            **self.split_params,
            "fingerprint": self.fingerprint,
            "encoder": self.encoder,
            "max_tokens": self.max_tokens,
            "skipped_records": None if self.load_report is None else self.load_report.skipped,
            "counts": {name: int(len(rows)) for name, rows in self.splits.items()},
            "ids": {name: [self.ids[i] for i in rows] for name, rows in self.splits.items()},
        }

    def summary(self) -> str:
        """One console line: records used (and of how many, when ``data.max_samples`` cut them), split, fingerprint."""
        available = self.split_params.get("records_available", len(self))
        used = f"{len(self):,} records"
        if "holdout_of" in self.split_params:
            used = (
                f"held-out set of {len(self):,} records: the {self.split_params['holdout_of']:,} outside the "
                "data.max_samples draw, less those whose normalised text is drawn or repeats"
            )
        elif available > len(self):
            used = f"{len(self):,} of {available:,} records used (data.max_samples)"
        if self.load_report is not None and self.load_report.skipped:
            used += f", {self.load_report.skipped:,} bad records skipped (data.on_bad_record=skip)"
        split = " / ".join(f"{name} {len(rows):,}" for name, rows in self.splits.items())
        return (
            f"{self.split_params.get('source')}: {used}; split {split}; fingerprint {self.fingerprint[:12]}"
        )

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}={len(rows)}" for name, rows in self.splits.items())
        return (
            f"EncodedData({self.split_params.get('source')}: {len(self)} rows ({counts}), "
            f"E={self.input_dim}, {self.encoder}, max_tokens={self.max_tokens}, "
            f"fingerprint={self.fingerprint[:12]})"
        )


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True, eq=False)
class Batch:
    """B rows, padded to the longest in the batch (T tokens).

    tokens: (B, T, E) float32, zero after each row's length.
    mask: (B, T) bool, True for real tokens.
    pooled: (B, E) float32.
    targets: per task, (B, C) float32 soft_classification, (B,) int64
        classification, (B, dim) float32 regression.
    target_mask: per task, (B,) bool.
    index: (B,) int64 row indices into the ``EncodedData``.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    targets: dict[str, torch.Tensor]
    target_mask: dict[str, torch.Tensor]
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """This batch with every tensor on ``device``."""
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                moved[f.name] = {k: v.to(device, non_blocking=non_blocking) for k, v in value.items()}
            else:
                moved[f.name] = value.to(device, non_blocking=non_blocking)
        return Batch(**moved)


def concat_batches(batches: Sequence[Batch], *, multiple: int = 1, cap: int | None = None) -> Batch:
    """One batch of every row of ``batches``, in order (CPU batches), padded to the longest of them
    rounded up to a multiple of ``multiple`` tokens, but not past ``cap`` (nor below the longest)."""
    longest = max(b.mask.shape[1] for b in batches)
    width = -(-longest // multiple) * multiple
    if cap is not None:
        width = max(longest, min(width, cap))
    if len(batches) == 1 and width == longest:
        return batches[0]

    def pad(t: torch.Tensor) -> torch.Tensor:  # (B, T, ...) -> (B, width, ...), zeros / False after T
        extra = width - t.shape[1]
        if extra == 0:
            return t
        return torch.cat([t, t.new_zeros((t.shape[0], extra, *t.shape[2:]))], dim=1)

    first = batches[0]
    return Batch(
        tokens=torch.cat([pad(b.tokens) for b in batches]),
        mask=torch.cat([pad(b.mask) for b in batches]),
        pooled=torch.cat([b.pooled for b in batches]),
        targets={k: torch.cat([b.targets[k] for b in batches]) for k in first.targets},
        target_mask={k: torch.cat([b.target_mask[k] for b in batches]) for k in first.target_mask},
        index=torch.cat([b.index for b in batches]),
    )


def _rows(data: EncodedData, split: str) -> np.ndarray:
    if split not in data.splits:
        raise ValueError(f"unknown split {split!r}; use one of {list(data.splits)}")
    return data.splits[split]


def num_batches(data: EncodedData, split: str, batch_size: int) -> int:
    """Batches per pass over ``split`` (the last one may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return math.ceil(len(_rows(data, split)) / batch_size)


def make_batch(data: EncodedData, rows: np.ndarray) -> Batch:
    """The batch of ``rows`` (int64 row indices), in that order."""
    lengths = data.token_length[rows]  # (B,)
    width = int(lengths.max())
    tokens = np.zeros((len(rows), width, data.input_dim), dtype=np.float32)  # (B, T, E)
    for j, (start, length) in enumerate(zip(data.token_start[rows], lengths, strict=True)):
        tokens[j, :length] = data.tokens[start : start + length]
    mask = np.arange(width)[None, :] < lengths[:, None]  # (B, T)
    return Batch(
        tokens=torch.from_numpy(tokens),
        mask=torch.from_numpy(mask),
        pooled=torch.from_numpy(np.ascontiguousarray(data.pooled[rows], dtype=np.float32)),
        targets={name: torch.from_numpy(np.ascontiguousarray(t[rows])) for name, t in data.targets.items()},
        target_mask={
            name: torch.from_numpy(np.ascontiguousarray(m[rows])) for name, m in data.target_mask.items()
        },
        index=torch.from_numpy(np.asarray(rows, dtype=np.int64)),
    )


def iterate_batches(
    data: EncodedData, split: str, batch_size: int, *, shuffle: bool, generator: torch.Generator | None
) -> Iterator[Batch]:
    """Batches over ``split``; the last one holds the remainder (nothing is dropped).

    shuffle: draw the order with ``torch.randperm(..., generator=generator)``, so the
    order depends only on that generator's state (save it with ``get_state()`` for
    exact resume); it is required then.  Without shuffle, rows come in index order
    and ``generator`` is not used.  The order is drawn when this is called.
    """
    rows = _rows(data, split)
    count = num_batches(data, split, batch_size)
    if shuffle:
        if generator is None:
            raise ValueError("shuffle=True needs a torch.Generator (its state decides the order)")
        # Drawn now, not at the first next(): the generator has advanced once this returns.
        rows = rows[torch.randperm(len(rows), generator=generator).numpy()]
    return (make_batch(data, rows[b * batch_size : (b + 1) * batch_size]) for b in range(count))
