"""Per-task losses and metrics, each over the rows that carry its target.

Logits go into cross-entropy (never softmax first); soft targets use log_softmax;
regression is MSE on exactly matching shapes.  Rows whose target is missing weigh
zero, and their placeholder target (NaN, -1) is replaced before the arithmetic, so
it never reaches a loss or a gradient.  No boolean indexing: a masked sum over a
fixed shape never makes the host wait for the device.  Non-finite losses are left
visible, never zeroed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from redheart_tune.model.groups import GROUPS, MODULE_TASK
from redheart_tune.model.tasks import TaskSpec


def _check_shapes(pred: torch.Tensor, target: torch.Tensor, spec: TaskSpec) -> None:
    B = pred.shape[0]
    if pred.shape != (B, spec.dim):
        raise ValueError(
            f"task {spec.name!r}: prediction shape {tuple(pred.shape)}, expected (B, {spec.dim})"
        )
    if spec.kind == "classification":
        if target.shape != (B,) or target.dtype != torch.long:
            raise ValueError(
                f"task {spec.name!r}: class-index target must be (B,) long, got {tuple(target.shape)} {target.dtype}"
            )
    elif target.shape != pred.shape:
        raise ValueError(
            f"task {spec.name!r}: target shape {tuple(target.shape)} != prediction shape {tuple(pred.shape)}"
        )


def row_losses(pred: torch.Tensor, target: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Loss of each row (B,): cross-entropy from logits, soft-target cross-entropy, or MSE averaged over dim."""
    _check_shapes(pred, target, spec)
    pred = pred.float()  # losses in fp32 even under autocast
    if spec.kind == "classification":
        return F.cross_entropy(pred, target, reduction="none")
    if spec.kind == "soft_classification":
        # Cross-entropy against a distribution; its minimum is the target's entropy (KL = 0).
        return -(target * F.log_softmax(pred, dim=-1)).sum(-1)
    return ((pred - target) ** 2).mean(-1)


def masked_row_losses(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, spec: TaskSpec
) -> torch.Tensor:
    """``row_losses`` (B,) with 0 where ``mask`` (B,) is False; a missing row's placeholder target is
    replaced by 0 first, so its loss and its gradient are exactly 0 and finite."""
    assert mask.shape == (pred.shape[0],) and mask.dtype == torch.bool, "target mask must be (B,) bool"
    keep = mask if target.ndim == 1 else mask.unsqueeze(-1)
    safe = torch.where(keep, target, torch.zeros((), dtype=target.dtype, device=target.device))
    return torch.where(mask, row_losses(pred, safe, spec), 0.0)


def task_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Mean loss over the rows where ``mask`` (B,) is True; 0 (still differentiable) when none is."""
    return masked_row_losses(pred, target, mask, spec).sum() / mask.sum().clamp(min=1)


def module_losses(
    outputs: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    target_mask: dict[str, torch.Tensor],
    tasks: dict[str, TaskSpec],
) -> dict[str, torch.Tensor]:
    """Scalar loss of every module in ``outputs``, plus "backbone".

    The backbone predicts nothing: its loss is the mean of the four heads' losses,
    the only signal it is trained on.  It is reported, not added again to the total.
    """
    losses = {}
    for module, pred in outputs.items():
        task = MODULE_TASK[module]
        losses[module] = task_loss(pred, targets[task], target_mask[task], tasks[task])
    heads = [m for m in GROUPS["group_a"] if MODULE_TASK[m] is not None]
    if all(h in losses for h in heads):
        losses["backbone"] = torch.stack([losses[h] for h in heads]).mean()
    return losses


def total_loss(losses: dict[str, torch.Tensor], task_weights: dict[str, float]) -> torch.Tensor:
    """Weighted mean of the module losses that have a task (not "backbone", already inside the heads').

    A module weighs ``task_weights[its task]``, 1.0 where the task is missing.
    """
    modules = [m for m in losses if MODULE_TASK[m] is not None]
    weights = [task_weights.get(MODULE_TASK[m], 1.0) for m in modules]
    if sum(weights) <= 0:
        raise ValueError(f"task weights sum to zero over the modules {modules}")
    return sum(w * losses[m] for w, m in zip(weights, modules, strict=True)) / sum(weights)


@torch.no_grad()
def metric_sums(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, spec: TaskSpec
) -> tuple[float, int]:
    """(sum, count) over the unmasked rows, to accumulate over a data set.

    Classification kinds: number of correct argmax predictions (against the class
    index, or the soft target's argmax), so accuracy = sum / count.  Regression:
    sum over rows of the absolute error averaged over dim, so MAE = sum / count.
    ``pred`` may be logits or the fused probabilities / values.
    """
    pred, target = pred[mask], target[mask]
    _check_shapes(pred, target, spec)
    return float(row_metric(pred, target, spec).sum()), int(mask.sum())


def row_metric(pred: torch.Tensor, target: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """Per row (B,), what the task's headline metric averages: 1.0 / 0.0 for a right / wrong argmax
    (against the class index, or the soft target's argmax), or the absolute error averaged over dim."""
    if spec.kind == "regression":
        return (pred.float() - target).abs().mean(-1)
    labels = target if spec.kind == "classification" else target.argmax(-1)
    return (pred.argmax(-1) == labels).float()
