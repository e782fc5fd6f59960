"""Task descriptions: what each of the four tasks predicts.

A data set describes its tasks with ``TaskSpec``; the model sizes its output
layers and picks its losses and metrics from them.  Nothing about a task's
output size or type is hard-coded in the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TASKS: tuple[str, ...] = ("emotion", "bentham", "regret", "surd")

TaskKind = Literal["soft_classification", "classification", "regression"]
TASK_KINDS: tuple[str, ...] = ("soft_classification", "classification", "regression")


@dataclass(frozen=True)
class TaskSpec:
    """One task of a data set.

    kind:
      - ``soft_classification``: target is a (B, dim) probability distribution;
        loss is cross-entropy against it from logits; metric is argmax accuracy
        against the target's argmax (the majority class).
      - ``classification``: target is a (B,) class index; cross-entropy; accuracy.
      - ``regression``: target is (B, dim) floats; loss MSE; metric MAE.
    labels: one name per class (classification kinds) or per output (regression).
    """

    name: str
    kind: TaskKind
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"task name {self.name!r} is not one of {TASKS}")
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {TASK_KINDS}")
        if not self.labels:
            raise ValueError(f"task {self.name!r}: needs at least one label")

    @property
    def dim(self) -> int:
        """Output size of a module predicting this task."""
        return len(self.labels)

    @property
    def is_classification(self) -> bool:
        return self.kind != "regression"

    @property
    def metric(self) -> str:
        """Headline metric name: 'accuracy' (higher is better) or 'mae' (lower is better)."""
        return "accuracy" if self.is_classification else "mae"
