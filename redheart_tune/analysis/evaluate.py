"""Honest evaluation: every method is chosen on validation data, then scored once on each held-out set.

Two steps, kept apart on purpose:

1. ``select_methods(run, val_data, ...)`` (``analysis.selection``) decides *what* each method is (which
   epochs, which sweet spots, which soup members, which fusion weights) from the
   checkpoints' recorded validation metrics and, for the greedy soups and the
   learned fusion, from passes over ``val_data``.  ``val_data`` is
   ``val_only(data)``: a copy of the data holding the validation rows alone, so no
   test row, input or label, can reach a selection; the second held-out set
   (``tune.data.prepare_holdout``) is a separate data set that selection is never given.
2. ``evaluate_methods(plan, run, {"test": data, "holdout": holdout}, ...)`` (here) builds
   each method's model(s) and scores it on the test split and on the held-out set.

This module predicts and scores (every pass over data goes through ``predict_modules`` or
``unit_val_loss``); the weights come from ``analysis.weights``, ``analysis.crossover`` and
``analysis.soups``, the learned fusion from ``analysis.fusion``, and the tables over seeds from
``analysis.seeds``.

Methods (the names are the rows of results.csv):

    crossover            one model, every unit from its sweet-spot checkpoint
    crossover_ensemble   mean fused prediction of the crossover's ±Δ variants
    group_window_soup    every unit's weights averaged over the checkpoints within ±k of its own sweet spot
    group_greedy_soup    every unit's weights averaged over the checkpoints it keeps greedily: its sweet spot,
                         then by its own validation loss, each kept only if the unit's validation loss does not rise
    learned_fusion       the crossover's weights, with per-task module weights learned on validation
                         (non-negative, summing to 1) instead of the mean of the modules
    last                 the last complete checkpoint
    best_single          the checkpoint with the lowest validation loss
    uniform_soup         weight average of the top-k checkpoints by validation loss
    greedy_soup          checkpoints added by validation loss, each kept only if the soup's validation loss improves
    topk_ensemble        mean fused prediction of the top-k checkpoints by validation loss

Per method and held-out set: ``fused_loss`` (loss of the system's fused
prediction, comparable across single models and prediction ensembles),
``model_loss`` (the training objective, defined for single weight sets only) and
every task's headline metric (``<task>_accuracy`` or ``<task>_mae``); per row, the
values those metrics average (``row_metrics``), for the intervals of
``analysis.uncertainty``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from redheart_tune.analysis.crossover import build_crossover
from redheart_tune.analysis.experiment import TrainingRun
from redheart_tune.analysis.soups import build_group_soup, soup_model
from redheart_tune.analysis.weights import broken_epochs, model_for_state
from redheart_tune.data import EncodedData, iterate_batches
from redheart_tune.engine.checkpoints import load_model_state
from redheart_tune.engine.memory import EvalMover, predict_outputs
from redheart_tune.model.family import fuse
from redheart_tune.model.groups import SelectionUnit
from redheart_tune.model.losses import metric_sums, module_losses, row_metric, task_loss, total_loss
from redheart_tune.model.tasks import TaskSpec

METHODS: tuple[str, ...] = (
    "crossover",
    "crossover_ensemble",
    "group_window_soup",
    "group_greedy_soup",
    "learned_fusion",
    "last",
    "best_single",
    "uniform_soup",
    "greedy_soup",
    "topk_ensemble",
)


class EvaluationError(RuntimeError):
    """Evaluation cannot be done honestly (different data split, no checkpoints); the message says why."""


# ---------------------------------------------------------------------------
# The validation-only view


def val_only(data: EncodedData) -> EncodedData:
    """A copy of ``data`` holding only its validation rows, re-indexed as the split "val".

    Targets, masks, pooled vectors and ids of every other row are dropped, and the
    view has no "train" or "test" split, so ``iterate_batches(view, "test", ...)``
    fails: whatever receives it cannot look at the test split.  The flat token
    array is shared (read-only, possibly a memory map of the encoding cache that
    also holds other texts); only the validation rows' offsets point into it.
    """
    rows = np.asarray(data.splits["val"], dtype=np.int64)
    return dataclasses.replace(
        data,
        token_start=data.token_start[rows],
        token_length=data.token_length[rows],
        pooled=data.pooled[rows],
        targets={t: v[rows] for t, v in data.targets.items()},
        target_mask={t: v[rows] for t, v in data.target_mask.items()},
        ids=tuple(data.ids[i] for i in rows),
        texts=None if data.texts is None else tuple(data.texts[i] for i in rows),
        splits={"val": np.arange(len(rows), dtype=np.int64)},
    )


# ---------------------------------------------------------------------------
# Predictions and scores


@dataclasses.dataclass
class Predictions:
    """Fused predictions of one model or ensemble over a split, in row order."""

    fused: dict[str, torch.Tensor]  # task -> (N, dim): probabilities (classification kinds) or values
    model_loss: float | None  # the training objective; None for a prediction ensemble (it has no one model)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What scoring needs besides the model: the tasks, the loss weighting, the fusion, the device."""

    tasks: dict[str, TaskSpec]
    task_weights: dict[str, float]
    fusion_weights: dict[str, float]
    device: torch.device
    batch_size: int = 256
    chunk_rows: int = 8192
    """Rows whose inputs sit in memory at once while the units take turns on the device."""


@torch.no_grad()
def predict_modules(
    model: nn.Module, data: EncodedData, split: str, s: EvalSettings
) -> tuple[dict[str, torch.Tensor], float]:
    """One pass over ``split``: every module's output (N, dim) on the CPU, in row order, and the mean
    training loss (per batch, weighted by its rows, as training's validation computes it).

    The model stays on the CPU; on a GPU each unit visits the device for its pass
    over a chunk of batches (``EvalMover``), so a model larger than the card's
    budget is evaluated as well as a small one.
    """
    parts: dict[str, list[torch.Tensor]] = {}
    total, rows = 0.0, 0
    mover = EvalMover(model, s.device)
    batches = iterate_batches(data, split, s.batch_size, shuffle=False, generator=None)
    while chunk := list(itertools.islice(batches, max(1, s.chunk_rows // s.batch_size))):
        outs = predict_outputs(model, chunk, device=s.device, autocast_dtype=None, placement=mover)
        for batch, outputs in zip(chunk, outs, strict=True):
            batch = batch.to(s.device)
            losses = module_losses(outputs, batch.targets, batch.target_mask, s.tasks)
            total += total_loss(losses, s.task_weights).item() * len(batch)
            rows += len(batch)
            for module, out in outputs.items():
                parts.setdefault(module, []).append(out.cpu())
    if rows == 0:
        raise EvaluationError(f"split {split!r} has no rows")
    return {m: torch.cat(p) for m, p in parts.items()}, total / rows


def predict(
    model: nn.Module,
    data: EncodedData,
    split: str,
    s: EvalSettings,
    fusion_weights: Mapping[str, float] | None = None,
) -> Predictions:
    """The fused prediction of every row of ``split`` (with ``fusion_weights``, or the settings' when
    None) and the mean training loss."""
    outputs, model_loss = predict_modules(model, data, split, s)
    weights = s.fusion_weights if fusion_weights is None else fusion_weights
    return Predictions(fuse(outputs, s.tasks, dict(weights)), model_loss)


def average_predictions(preds: Sequence[Predictions]) -> Predictions:
    """The prediction ensemble: mean of the members' fused probabilities / values."""
    if not preds:
        raise EvaluationError("an ensemble needs at least one member")
    tasks = preds[0].fused.keys()
    return Predictions({t: torch.stack([p.fused[t] for p in preds]).mean(0) for t in tasks}, None)


def split_targets(data: EncodedData, split: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    rows = data.splits[split]
    targets = {t: torch.from_numpy(np.ascontiguousarray(v[rows])) for t, v in data.targets.items()}
    masks = {t: torch.from_numpy(np.ascontiguousarray(v[rows])) for t, v in data.target_mask.items()}
    return targets, masks


def fused_task_loss(
    fused: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, spec: TaskSpec
) -> torch.Tensor:
    """The task's training loss of a fused prediction (probabilities for the classification kinds)."""
    # Probabilities become log-probabilities: log_softmax(log p) = log p, so the model's own
    # cross-entropy gives exactly the fused distribution's cross-entropy.
    as_logits = torch.log(fused.clamp_min(1e-12)) if spec.is_classification else fused
    return task_loss(as_logits, target, mask, spec)


def score(pred: Predictions, data: EncodedData, split: str, s: EvalSettings) -> dict[str, float]:
    """fused_loss, model_loss and each task's headline metric (``<task>_accuracy`` / ``<task>_mae``)."""
    targets, masks = split_targets(data, split)
    out: dict[str, float] = {}
    losses, weights = [], []
    for task, spec in s.tasks.items():
        p = pred.fused[task].float()
        if masks[task].any():
            losses.append(fused_task_loss(p, targets[task], masks[task], spec).item())
            weights.append(s.task_weights.get(task, 1.0))
        total, count = metric_sums(p, targets[task], masks[task], spec)
        out[f"{task}_{spec.metric}"] = total / count if count else float("nan")
    out["fused_loss"] = float(np.average(losses, weights=weights)) if losses else float("nan")
    out["model_loss"] = float("nan") if pred.model_loss is None else float(pred.model_loss)
    return out


def row_metrics(pred: Predictions, data: EncodedData, split: str, s: EvalSettings) -> dict[str, np.ndarray]:
    """Per task, the (N,) values its headline metric averages: 1.0 / 0.0 for a right / wrong argmax (an
    accuracy), the absolute error averaged over the outputs (an MAE); NaN where the row has no target.
    Their mean over the non-NaN rows is ``score``'s metric."""
    targets, masks = split_targets(data, split)
    out = {}
    for task, spec in s.tasks.items():
        values = row_metric(pred.fused[task].float(), targets[task], spec).double().numpy()
        values[~masks[task].numpy()] = np.nan
        out[f"{task}_{spec.metric}"] = values
    return out


@torch.no_grad()
def unit_val_loss(model: nn.Module, unit: SelectionUnit, val_data: EncodedData, s: EvalSettings) -> float:
    """The unit's validation loss as the sweet-spot table defines it: the mean of its modules' losses
    (those > 0; group A's backbone loss is the mean of its heads'), each the mean over the "val" rows.

    Only the unit runs (``RedHeart.forward_unit``): a unit reads the encoder and itself, so the other
    units' weights cannot change its loss.  On a GPU only the unit's weights visit the device.
    """
    model.eval()
    mover = EvalMover(model, s.device)
    sums: dict[str, float] = {}
    rows = 0
    mover.begin_eval(unit.name)
    try:
        for batch in iterate_batches(val_data, "val", s.batch_size, shuffle=False, generator=None):
            b = batch.to(s.device)
            outputs = model.forward_unit(unit.name, b.tokens, b.mask, b.pooled)
            for m, loss in module_losses(outputs, b.targets, b.target_mask, s.tasks).items():
                sums[m] = sums.get(m, 0.0) + loss.item() * len(b)
            rows += len(b)
    finally:
        mover.end_eval(unit.name)
    measured = [sums[m] / rows for m in unit.modules if m in sums and sums[m] > 0]
    if not rows or not measured:
        raise EvaluationError(f"unit {unit.name!r}: no validation loss to measure (no rows or no target)")
    return float(np.mean(measured))


# ---------------------------------------------------------------------------
# The model(s) of a method


def iter_models(run: TrainingRun, entry: Mapping) -> Iterator[nn.Module]:
    """The model(s) a plan entry describes, built one at a time (an ensemble of big models never
    sits in memory at once): one for weight methods, several for prediction ensembles."""
    kind = entry["kind"]
    problems = broken_epochs(run)
    if kind == "crossover":
        yield build_crossover(entry["spots"], run.complete, run.meta, problems=problems)[0]
    elif kind == "crossover_ensemble":
        for spots in entry["variants"].values():
            yield build_crossover(spots, run.complete, run.meta, problems=problems)[0]
    elif kind == "checkpoint":
        for e in entry["epochs"]:
            yield model_for_state(run, load_model_state(run.complete[e]), str(run.complete[e]))
    elif kind == "soup":
        yield soup_model(run, entry["epochs"])
    elif kind == "group_soup":
        yield build_group_soup(entry["members"], run.complete, run.meta, problems=problems)[0]
    else:
        raise EvaluationError(f"unknown plan entry kind {kind!r}")


# ---------------------------------------------------------------------------
# Scoring the plan on the test split


RowScores = dict[str, dict[str, dict[str, np.ndarray]]]
"""``values[split][method][metric]``: (N,) per-row values (``row_metrics``)."""


def evaluate_methods(
    plan: Mapping[str, Mapping], run: TrainingRun, sets: Mapping[str, EncodedData], s: EvalSettings
) -> tuple[pd.DataFrame, RowScores]:
    """One row per held-out set and method (its members and its scores), and the per-row values.

    ``sets`` maps a split name to the data holding it ({"test": data, "holdout": holdout}); each model
    is built once and scored on every set.
    """
    rows: dict[str, list[dict]] = {split: [] for split in sets}
    values: RowScores = {split: {} for split in sets}
    for method, entry in plan.items():
        fusion = entry.get("fusion_weights", s.fusion_weights)
        preds: dict[str, list[Predictions]] = {split: [] for split in sets}
        for model in iter_models(run, entry):
            for split, data in sets.items():
                preds[split].append(predict(model, data, split, s, fusion))
        for split, data in sets.items():
            pred = preds[split][0] if len(preds[split]) == 1 else average_predictions(preds[split])
            rows[split].append(
                {
                    "method": method,
                    "split": split,
                    "rows": len(data.splits[split]),
                    "members": _members(entry),
                    **score(pred, data, split, s),
                }
            )
            values[split][method] = row_metrics(pred, data, split, s)
    return pd.DataFrame([r for split in sets for r in rows[split]]), values


def _members(entry: Mapping) -> str:
    if entry["kind"] == "crossover":
        return " ".join(f"{u}@{e}" for u, e in entry["spots"].items())
    if entry["kind"] == "crossover_ensemble":
        return " ".join(f"d{d}" for d in entry["variants"])
    if entry["kind"] == "group_soup":
        return " ".join(f"{u}@{','.join(str(e) for e in es)}" for u, es in entry["members"].items())
    return " ".join(f"epoch{e}" for e in entry["epochs"])
