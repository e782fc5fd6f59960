"""``RawData``: parsed texts and targets of one source, before sampling and encoding.

Both sources (``redheart`` and ``vader``) parse into this one shape, so sampling,
encoding and splitting do not care where the data came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from redheart_tune.model.tasks import TASKS, TaskSpec

from .errors import DataError


@dataclass(frozen=True)
class LoadReport:
    """What a load of record file ``path`` kept and dropped (``data.on_bad_record=skip``).

    reasons: the first few skip reasons, as full messages (file, index, id, field).
    """

    path: str
    total: int
    kept: int
    skipped: int
    reasons: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class RawData:
    """Texts and targets of one source, one row per record.

    ids: (N,) unique record ids (str).
    texts: the N texts to encode.
    targets: per task, (N, dim) float32 for soft_classification / regression,
        (N,) int64 for classification.
    target_mask: per task, (N,) bool; True where the record has that target.
    tasks: the task descriptions the targets follow.
    strata: (N,) int64 group of each row for a stratified split, or None.
    """

    ids: tuple[str, ...]
    texts: tuple[str, ...]
    targets: dict[str, np.ndarray]
    target_mask: dict[str, np.ndarray]
    tasks: dict[str, TaskSpec]
    strata: np.ndarray | None

    def __post_init__(self) -> None:
        # Internal consistency: a failure here is a bug in a loader, not bad input.
        n = len(self.ids)
        if len(self.texts) != n:
            raise AssertionError(f"{len(self.texts)} texts for {n} ids")
        if set(self.tasks) != set(TASKS) or set(self.targets) != set(TASKS):
            raise AssertionError(f"tasks {sorted(self.tasks)} / targets {sorted(self.targets)} != {TASKS}")
        for name, spec in self.tasks.items():
            t = self.targets[name]
            expected = (n,) if spec.kind == "classification" else (n, spec.dim)
            if t.shape != expected:
                raise AssertionError(f"targets[{name!r}] has shape {t.shape}, expected {expected}")
            if self.target_mask[name].shape != (n,) or self.target_mask[name].dtype != np.bool_:
                raise AssertionError(f"target_mask[{name!r}] must be a (N,) bool array")
        if len(set(self.ids)) != n:
            raise DataError("record ids are not unique")

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: np.ndarray) -> RawData:
        """The rows ``rows`` (int indices) in that order."""
        return RawData(
            ids=tuple(self.ids[i] for i in rows),
            texts=tuple(self.texts[i] for i in rows),
            targets={k: v[rows] for k, v in self.targets.items()},
            target_mask={k: v[rows] for k, v in self.target_mask.items()},
            tasks=self.tasks,
            strata=None if self.strata is None else self.strata[rows],
        )
