"""The learned fusion: per task, module weights fitted on validation data instead of the mean of the
modules (the ``learned_fusion`` method of ``analysis.evaluate``)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from redheart_tune.analysis.evaluate import EvalSettings, fused_task_loss, split_targets
from redheart_tune.data import EncodedData
from redheart_tune.model.groups import MODULE_TASK
from redheart_tune.model.tasks import TaskSpec


def learn_fusion_weights(
    outputs: Mapping[str, torch.Tensor], val_data: EncodedData, s: EvalSettings
) -> tuple[dict[str, float], dict[str, dict]]:
    """Per task, module weights (non-negative, summing to 1 over the task's modules) that minimise the
    fused prediction's validation loss, and per task the weights and the loss before and after.

    ``outputs`` are every module's outputs on ``val_data``'s "val" rows (``predict_modules``).  The fit
    starts from the crossover's own fusion (``s.fusion_weights``, 1.0 where missing, normalised); a
    module the config weighs 0 stays at 0.
    """
    targets, masks = split_targets(val_data, "val")
    weights: dict[str, float] = {}
    record: dict[str, dict] = {}
    for task, spec in s.tasks.items():
        members = [m for m in outputs if MODULE_TASK.get(m) == task]
        weights.update({m: 0.0 for m in members if s.fusion_weights.get(m, 1.0) <= 0})
        members = [m for m in members if s.fusion_weights.get(m, 1.0) > 0]
        if not members:
            continue
        preds = torch.stack(
            [
                torch.softmax(outputs[m].double(), -1) if spec.is_classification else outputs[m].double()
                for m in members
            ]
        )  # (M, N, dim)
        start = torch.tensor([s.fusion_weights.get(m, 1.0) for m in members], dtype=torch.float64)
        w, before, after = fit_simplex_weights(preds, targets[task], masks[task], spec, start)
        task_weights = {m: float(x) for m, x in zip(members, w, strict=True)}
        weights.update(task_weights)
        record[task] = {"weights": task_weights, "val_loss_config_fusion": before, "val_loss_learned": after}
    return weights, record


def fit_simplex_weights(
    preds: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    spec: TaskSpec,
    start: torch.Tensor | None = None,
    max_iter: int = 100,
) -> tuple[torch.Tensor, float, float]:
    """Weights w (M,) on the simplex minimising ``fused_task_loss`` of sum_m w_m preds[m] (preds (M, N, dim):
    probabilities or values), with the loss at the start and at w.

    w is a softmax over one logit per module, starting from ``start`` (positive weights, normalised;
    None: the plain mean), fitted by L-BFGS with a strong-Wolfe line search on the whole split: no
    randomness, so the same inputs give the same weights.  A fit that ends non-finite or above its
    start returns the start.
    """
    first = torch.ones(preds.shape[0], dtype=torch.float64) if start is None else start.double()
    initial = torch.log(first / first.sum())
    logits = initial.clone().requires_grad_(True)

    def loss_of(z: torch.Tensor) -> torch.Tensor:
        fused = torch.einsum("m,mnd->nd", torch.softmax(z, 0), preds)  # (N, dim)
        return fused_task_loss(fused, target, mask, spec)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(logits)
        loss.backward()
        return loss

    with torch.enable_grad():
        before = loss_of(logits).item()
        if bool(mask.any()) and preds.shape[0] > 1:
            opt = torch.optim.LBFGS(
                [logits],
                lr=1.0,
                max_iter=max_iter,
                tolerance_grad=1e-9,
                tolerance_change=1e-12,
                line_search_fn="strong_wolfe",
            )
            opt.step(closure)
        after = loss_of(logits).item()
    if not (math.isfinite(after) and after <= before and bool(torch.isfinite(logits).all())):
        return torch.softmax(initial, 0), before, before
    return torch.softmax(logits.detach(), 0), before, after
