"""Honest evaluation: every method is chosen on validation data, then scored once on each held-out set.

Two steps, kept apart on purpose:

1. ``select_methods(run, val_data, ...)`` decides *what* each method is (which
   epochs, which sweet spots, which soup members, which fusion weights) from the
   checkpoints' recorded validation metrics and, for the greedy soups and the
   learned fusion, from passes over ``val_data``.  ``val_data`` is
   ``val_only(data)``: a copy of the data holding the validation rows alone, so no
   test row, input or label, can reach a selection; the second held-out set
   (``tune.data.prepare_holdout``) is a separate data set that selection is never given.
2. ``evaluate_methods(plan, run, {"test": data, "holdout": holdout}, ...)`` builds
   each method's model(s) and scores it on the test split and on the held-out set.

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
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from redheart_tune.analysis.crossover import (
    DEFAULT_DELTAS,
    SoupSum,
    build_crossover,
    build_group_soup,
    check_compatible,
    check_state,
    load_unit,
    model_from_meta,
    set_unit_tensors,
    variant_spots,
    window_members,
)
from redheart_tune.analysis.experiment import TrainingRun
from redheart_tune.analysis.sweet_spots import select_sweet_spots, unit_scores
from redheart_tune.data import EncodedData, iterate_batches
from redheart_tune.engine.checkpoints import load_model_state
from redheart_tune.engine.memory import EvalMover, predict_outputs
from redheart_tune.model.family import fuse
from redheart_tune.model.groups import MODULE_TASK, SelectionUnit, selection_units
from redheart_tune.model.losses import metric_sums, module_losses, row_metric, task_loss, total_loss
from redheart_tune.model.tasks import TaskSpec
from redheart_tune.util.files import write_atomic

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
BASELINE = "best_single"  # the paired differences over seeds are taken against it


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


# ---------------------------------------------------------------------------
# Weights of a method


def average_states(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform weight average (a "soup") of states in memory; every state must have the same keys."""
    soup = SoupSum()
    for st in states:
        soup.add(st)
    return soup.average(states[0])


def model_for_state(
    run: TrainingRun, state: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> nn.Module:
    """A fresh model of the run's architecture holding ``state`` (keys and shapes checked, strict load)."""
    model = model_from_meta(run.meta[min(run.complete)])
    check_state(state, model.state_dict(), source)
    model.load_state_dict(dict(state), strict=True)
    return model


def soup_model(run: TrainingRun, epochs: Sequence[int]) -> nn.Module:
    """The uniform weight average of the checkpoints of ``epochs``, read one at a time."""
    soup = SoupSum()
    for e in epochs:
        state = load_model_state(run.complete[e])
        soup.add(state)
    return model_for_state(run, soup.average(state), f"soup of epochs {list(epochs)} of {run.trial_path}")


def broken_epochs(run: TrainingRun) -> dict[int, str]:
    """Epoch -> why its checkpoint is not usable, for the errors of a sweet spot that points at one."""
    return {r.epoch: r.problem for r in run.checkpoints if not r.complete and r.epoch is not None}


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
# Selection: validation data only


def ranked_by_val_loss(run: TrainingRun) -> list[int]:
    """Complete checkpoint epochs, lowest recorded validation loss first (ties: earlier epoch)."""
    table = run.checkpoint_table.sort_values(["val_loss", "epoch"], kind="stable")
    return [int(e) for e in table["epoch"] if int(e) in run.complete]


def greedy_soup_epochs(
    run: TrainingRun, ranked: Sequence[int], val_data: EncodedData, s: EvalSettings
) -> list[int]:
    """Greedy soup (Wortsman et al. 2022) on validation loss: walk the checkpoints from the best,
    keep one only if the averaged weights' validation loss strictly improves."""
    members = [ranked[0]]
    first = load_model_state(run.complete[ranked[0]])
    soup = SoupSum()
    soup.add(first)
    best = predict(model_for_state(run, first, str(run.complete[ranked[0]])), val_data, "val", s).model_loss
    for epoch in ranked[1:]:
        candidate = soup.plus(load_model_state(run.complete[epoch]))
        candidate_model = model_for_state(run, candidate.average(first), f"soup with epoch {epoch}")
        loss = predict(candidate_model, val_data, "val", s).model_loss
        if loss < best:
            members.append(epoch)
            soup, best = candidate, loss
    return members


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


def group_greedy_members(
    run: TrainingRun, spots: Mapping[str, int], val_data: EncodedData, s: EvalSettings
) -> tuple[dict[str, list[int]], dict[str, dict]]:
    """Group greedy soup: per unit, the checkpoints it keeps, and a record of every try.

    Each unit starts from its sweet spot (``spots``) and walks the other complete checkpoints
    in the order of its own recorded validation loss (the mean of its modules' losses; no overfit
    penalty); a checkpoint is kept when the unit's validation loss, recomputed on ``val_data`` for the
    average of the kept weights and that checkpoint's, does not rise above the best so far.  Every
    other unit holds its sweet-spot weights while a unit is chosen.  A unit that keeps only its sweet
    spot is the crossover's unit.
    """
    model, _ = build_crossover(spots, run.complete, run.meta, problems=broken_epochs(run))
    members: dict[str, list[int]] = {}
    record: dict[str, dict] = {}
    for unit in selection_units():
        spot = int(spots[unit.name])
        if spot not in run.complete:
            raise EvaluationError(
                f"unit {unit.name!r}: its sweet spot {spot} is not a complete checkpoint of {run.path}"
            )
        losses = unit_scores(run.checkpoint_table, unit).dropna(subset=["unit_loss"])
        losses = losses[losses["epoch"].isin(list(run.complete)) & (losses["epoch"] != spot)]
        order = [spot, *(int(e) for e in losses.sort_values(["unit_loss", "epoch"], kind="stable")["epoch"])]
        spot_tensors = load_unit(run.complete[order[0]], unit)
        soup = SoupSum()
        soup.add(spot_tensors)
        best = unit_val_loss(model, unit, val_data, s)
        kept, tried = [order[0]], {str(order[0]): best}
        for epoch in order[1:]:
            candidate = soup.plus(load_unit(run.complete[epoch], unit))
            set_unit_tensors(model, unit, candidate.average(spot_tensors))
            loss = unit_val_loss(model, unit, val_data, s)
            tried[str(epoch)] = loss
            if loss <= best:
                kept.append(epoch)
                soup, best = candidate, loss
        set_unit_tensors(model, unit, spot_tensors)  # back to its sweet spot while the next unit is chosen
        members[unit.name] = kept
        record[unit.name] = {"order": order, "val_loss_with": tried, "val_loss": best}
    return members, record


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


def select_methods(
    run: TrainingRun,
    val_data: EncodedData,
    s: EvalSettings,
    *,
    k: int = 5,
    deltas: Sequence[int] = DEFAULT_DELTAS,
    rule: str = "spec",
    soup_window: int = 1,
    learned_fusion: bool = True,
) -> dict[str, dict]:
    """The plan: what every method is, decided from validation metrics only.

    ``val_data`` must be ``val_only(data)``; a data set that still has a "test"
    split is refused, so the test rows cannot leak into a choice.
    ``soup_window``: the group window soup's k (checkpoints on each side of a unit's sweet spot);
    ``learned_fusion``: also plan the crossover with learned fusion weights.
    """
    if set(val_data.splits) != {"val"}:
        raise EvaluationError(
            f"select_methods got a data set with splits {sorted(val_data.splits)}; pass val_only(data)"
        )
    if not run.complete:
        raise EvaluationError(f"{run.path}: no complete checkpoint to select from")
    check_compatible({e: run.meta[e] for e in run.complete}, run.complete)
    ranked = ranked_by_val_loss(run)
    spots = select_sweet_spots(run.checkpoint_table, rule=rule)
    top = ranked[:k]
    greedy_members, greedy_record = group_greedy_members(run, spots, val_data, s)
    plan: dict[str, dict] = {
        "crossover": {"kind": "crossover", "spots": spots},
        "crossover_ensemble": {
            "kind": "crossover_ensemble",
            "variants": {str(d): v for d, v in variant_spots(spots, deltas, sorted(run.complete)).items()},
        },
        "group_window_soup": {
            "kind": "group_soup",
            "window": soup_window,
            "members": window_members(spots, soup_window, sorted(run.complete)),
        },
        "group_greedy_soup": {"kind": "group_soup", "members": greedy_members, "tries": greedy_record},
    }
    if learned_fusion:
        crossover_model = build_crossover(spots, run.complete, run.meta, problems=broken_epochs(run))[0]
        outputs, _ = predict_modules(crossover_model, val_data, "val", s)
        weights, fit = learn_fusion_weights(outputs, val_data, s)
        plan["learned_fusion"] = {"kind": "crossover", "spots": spots, "fusion_weights": weights, "fit": fit}
    plan.update(
        {
            "last": {"kind": "checkpoint", "epochs": [max(run.complete)]},
            "best_single": {"kind": "checkpoint", "epochs": [ranked[0]]},
            "uniform_soup": {"kind": "soup", "epochs": top},
            "greedy_soup": {"kind": "soup", "epochs": greedy_soup_epochs(run, ranked, val_data, s)},
            "topk_ensemble": {"kind": "checkpoint", "epochs": top},
        }
    )
    return plan


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


# ---------------------------------------------------------------------------
# Several seeds


def metric_columns(results: pd.DataFrame) -> list[str]:
    """The score columns of a results table (losses and task metrics)."""
    skip = {"method", "seed", "split", "rows", "members"}
    return [c for c in results.columns if c not in skip and pd.api.types.is_numeric_dtype(results[c])]


def _keys(results: pd.DataFrame) -> list[str]:
    """What one row of a results table is per seed: a method, on one split when the table has splits."""
    return ["method", "split"] if "split" in results.columns else ["method"]


def aggregate_seeds(results: pd.DataFrame) -> pd.DataFrame:
    """Per method (and split): number of seeds, and mean and sample std (ddof=1; NaN for one seed) of every score."""
    _check_results(results)
    cols = metric_columns(results)
    keys = _keys(results)
    grouped = results.groupby(keys, sort=False)[cols]
    mean = grouped.mean().add_suffix("_mean")
    std = grouped.std(ddof=1).add_suffix("_std")
    n = results.groupby(keys, sort=False)["seed"].nunique().rename("n_seeds")
    out = pd.concat([n, mean, std], axis=1)
    return out[["n_seeds", *[c for col in cols for c in (f"{col}_mean", f"{col}_std")]]].reset_index()


def paired_differences(results: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Per method (and split) and score: mean and std over seeds of (method − baseline), paired by seed.

    A seed where either side is missing is left out of that pair, and ``n_pairs`` says how many remain.
    """
    _check_results(results)
    if baseline not in set(results["method"]):
        raise EvaluationError(
            f"baseline {baseline!r} is not among the methods {sorted(set(results['method']))}"
        )
    cols = metric_columns(results)
    splits = results["split"].drop_duplicates().tolist() if "split" in results.columns else [None]
    rows = []
    for split in splits:
        part = results if split is None else results[results["split"] == split]
        wide = part.set_index(["seed", "method"])[cols]
        base = wide.xs(baseline, level="method")
        for method in part["method"].drop_duplicates():
            if method == baseline:
                continue
            diff = (wide.xs(method, level="method") - base).dropna(how="all")
            for col in cols:
                d = diff[col].dropna()
                rows.append(
                    {
                        "method": method,
                        **({} if split is None else {"split": split}),
                        "metric": col,
                        "n_pairs": len(d),
                        "mean_diff": float(d.mean()) if len(d) else float("nan"),
                        "std_diff": float(d.std(ddof=1)) if len(d) > 1 else float("nan"),
                    }
                )
    return pd.DataFrame(rows)


def _check_results(results: pd.DataFrame) -> None:
    missing = {"method", "seed"} - set(results.columns)
    if missing:
        raise EvaluationError(f"results table lacks column(s) {sorted(missing)}")
    keys = ["seed", *_keys(results)]
    dup = results.duplicated(subset=keys)
    if dup.any():
        raise EvaluationError(
            f"results hold a method twice for one seed: {results.loc[dup, keys].values.tolist()}"
        )


def read_results(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate several runs' results.csv (one per seed)."""
    frames = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise EvaluationError(f"{p}: no such results file; run the evaluation of that seed first")
        frames.append(pd.read_csv(p))
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------
# Per-row values on disk (for the intervals over seeds)


def save_row_scores(path: Path, values: RowScores, ids: Mapping[str, Sequence[str]]) -> Path:
    """``values`` and each split's row ids as one .npz (``<split>/<method>/<metric>``, ``<split>/ids``)."""
    arrays = {
        f"{split}/{m}/{k}": v for split, by in values.items() for m, per in by.items() for k, v in per.items()
    }
    arrays.update({f"{split}/ids": np.asarray(list(ids[split]), dtype=str) for split in values})

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would add ".npz" to a name
            np.savez_compressed(f, **arrays)

    return write_atomic(Path(path), write)


def load_row_scores(path: Path) -> tuple[RowScores, dict[str, list[str]]]:
    """What ``save_row_scores`` wrote: (values, ids per split)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(
            f"{path}: no per-row scores; rerun that seed's evaluation (python run.py report)"
        )
    values: RowScores = {}
    ids: dict[str, list[str]] = {}
    with np.load(path, allow_pickle=False) as f:
        for key in f.files:
            split, rest = key.split("/", 1)
            if rest == "ids":
                ids[split] = f[key].tolist()
            else:
                method, metric = rest.split("/")
                values.setdefault(split, {}).setdefault(method, {})[metric] = f[key]
    return values, ids
