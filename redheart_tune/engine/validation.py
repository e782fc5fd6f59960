"""Every module's own loss and metric on a held-out split, in one pass: what the sweet-spot analysis reads.

Units run outer under a streaming placement (each visits the device once per pass), so
validation fits the same budget as training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from redheart_tune.data import EncodedData, iterate_batches
from redheart_tune.engine.memory import predict_outputs
from redheart_tune.engine.stats import ActivationStats
from redheart_tune.model.family import RedHeart, fuse
from redheart_tune.model.groups import MODULE_TASK
from redheart_tune.model.losses import metric_sums, module_losses, total_loss
from redheart_tune.model.tasks import TaskSpec

if TYPE_CHECKING:
    from redheart_tune.engine.loop import TrainingState

__all__ = ["ValidationResult", "validate", "validate_state"]


@dataclass
class ValidationResult:
    loss: float  # total loss, the same weighting as training
    module_loss: dict[str, float]
    module_metric: dict[str, float]  # accuracy (classification tasks) or MAE (regression)
    task_metric: dict[str, float]  # of the fused prediction per task
    accuracy: float  # the headline: fused emotion accuracy
    activations: dict | None = None


@torch.no_grad()
def validate(
    model: RedHeart,
    data: EncodedData,
    split: str,
    *,
    tasks: dict[str, TaskSpec],
    task_weights: dict[str, float],
    fusion_weights: dict[str, float],
    device: torch.device,
    batch_size: int = 256,
    autocast_dtype: torch.dtype | None = None,
    placement=None,
    collect_activations: bool = False,
) -> ValidationResult:
    """Every module's own loss and metric on a real split, in one pass (the table the sweet-spot analysis reads).

    ``placement``: a streaming one runs the units outer (each visits the device
    once per pass); without one the model must already be on ``device``.
    """
    activations = ActivationStats() if collect_activations else None
    loss_sums: dict[str, float] = {}
    metric_acc: dict[str, list[float]] = {}
    fused_acc: dict[str, list[float]] = {}
    total, rows = 0.0, 0
    batches = list(iterate_batches(data, split, batch_size, shuffle=False, generator=None))
    outputs_of = predict_outputs(
        model, batches, device=device, autocast_dtype=autocast_dtype, placement=placement, record=activations
    )
    for batch, outputs in zip(batches, outputs_of, strict=True):
        batch = batch.to(device)
        losses = module_losses(outputs, batch.targets, batch.target_mask, tasks)
        bsz = len(batch)
        for m, v in losses.items():
            loss_sums[m] = loss_sums.get(m, 0.0) + v.item() * bsz
        total += total_loss(losses, task_weights).item() * bsz
        rows += bsz
        for m, out in outputs.items():
            task = MODULE_TASK[m]
            s, n = metric_sums(out, batch.targets[task], batch.target_mask[task], tasks[task])
            acc = metric_acc.setdefault(m, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(n)
        for task, pred in fuse(outputs, tasks, fusion_weights).items():
            s, n = metric_sums(pred, batch.targets[task], batch.target_mask[task], tasks[task])
            acc = fused_acc.setdefault(task, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(n)
    task_metric = {t: s / max(n, 1) for t, (s, n) in fused_acc.items()}
    return ValidationResult(
        loss=total / max(rows, 1),
        module_loss={m: v / max(rows, 1) for m, v in loss_sums.items()},
        module_metric={m: s / max(n, 1) for m, (s, n) in metric_acc.items()},
        task_metric=task_metric,
        accuracy=task_metric.get("emotion", float("nan")),
        activations=activations.result() if activations else None,
    )


def validate_state(
    state: TrainingState, data: EncodedData, split: str = "val", *, collect_activations: bool = False
) -> ValidationResult:
    """``validate`` with a training state's model, device, precision, placement and loss settings."""
    return validate(
        state.model,
        data,
        split,
        tasks=state.tasks,
        task_weights=state.task_weights,
        fusion_weights=state.fusion_weights,
        device=state.device,
        batch_size=state.eval_batch_size,
        autocast_dtype=state.autocast_dtype,
        placement=state.placement,
        collect_activations=collect_activations,
    )
