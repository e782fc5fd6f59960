"""Honest evaluation: every method is chosen on validation data, then scored once on the test split.

Two steps, kept apart on purpose:

1. ``select_methods(run, val_data, ...)`` decides *what* each method is (which
   epochs, which sweet spots, which soup members) from the checkpoints' recorded
   validation metrics and, for the greedy soup, from passes over ``val_data``.
   ``val_data`` is ``val_only(data)``: a copy of the data holding the validation
   rows alone, so no test row, input or label, can reach a selection.
2. ``evaluate_methods(plan, run, data, "test")`` builds each method's model(s)
   and scores it on the test split.

Methods (the names are the rows of results.csv):

    crossover            one model, every unit from its sweet-spot checkpoint (SPEC §6)
    crossover_ensemble   mean fused prediction of the crossover's ±Δ variants
    last                 the last complete checkpoint
    best_single          the checkpoint with the lowest validation loss
    uniform_soup         weight average of the top-k checkpoints by validation loss
    greedy_soup          checkpoints added by validation loss, each kept only if the soup's validation loss improves
    topk_ensemble        mean fused prediction of the top-k checkpoints by validation loss

Per method: ``fused_loss`` (loss of the system's fused prediction, comparable
across single models and prediction ensembles), ``model_loss`` (the training
objective, defined for single weight sets only) and every task's headline metric
(``<task>_accuracy`` or ``<task>_mae``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from analysis.crossover import (
    DEFAULT_DELTAS,
    build_crossover,
    check_compatible,
    check_state,
    model_from_meta,
    variant_spots,
)
from analysis.experiment import TrainingRun
from analysis.sweet_spots import select_sweet_spots
from model.family import fuse
from model.losses import metric_sums, module_losses, task_loss, total_loss
from model.tasks import TaskSpec
from tune.checkpoints import load_model_state
from tune.data import EncodedData, iterate_batches
from tune.memory import EvalMover, predict_outputs

METHODS: tuple[str, ...] = (
    "crossover",
    "crossover_ensemble",
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
def predict(model: nn.Module, data: EncodedData, split: str, s: EvalSettings) -> Predictions:
    """One pass over ``split``: the fused prediction of every row and the mean training loss.

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
            for task, pred in fuse(outputs, s.tasks, s.fusion_weights).items():
                parts.setdefault(task, []).append(pred.cpu())
    if rows == 0:
        raise EvaluationError(f"split {split!r} has no rows")
    return Predictions({t: torch.cat(p) for t, p in parts.items()}, total / rows)


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


def score(pred: Predictions, data: EncodedData, split: str, s: EvalSettings) -> dict[str, float]:
    """fused_loss, model_loss and each task's headline metric (``<task>_accuracy`` / ``<task>_mae``)."""
    targets, masks = split_targets(data, split)
    out: dict[str, float] = {}
    losses, weights = [], []
    for task, spec in s.tasks.items():
        p = pred.fused[task].float()
        # Probabilities become log-probabilities: log_softmax(log p) = log p, so the model's own
        # cross-entropy gives exactly the fused distribution's cross-entropy.
        as_logits = torch.log(p.clamp_min(1e-12)) if spec.is_classification else p
        if masks[task].any():
            losses.append(task_loss(as_logits, targets[task], masks[task], spec).item())
            weights.append(s.task_weights.get(task, 1.0))
        total, count = metric_sums(p, targets[task], masks[task], spec)
        out[f"{task}_{spec.metric}"] = total / count if count else float("nan")
    out["fused_loss"] = float(np.average(losses, weights=weights)) if losses else float("nan")
    out["model_loss"] = float("nan") if pred.model_loss is None else float(pred.model_loss)
    return out


# ---------------------------------------------------------------------------
# Weights of a method


class SoupSum:
    """A running sum of state dicts, so a soup of big checkpoints holds two states in memory, not k."""

    def __init__(self) -> None:
        self.total: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.count and set(state) != set(self.total):
            raise EvaluationError(f"soup member {self.count} has different keys than member 0")
        for k, v in state.items():
            if not v.is_floating_point():  # counters and indices cannot be averaged; they must agree
                if self.count and not torch.equal(self.total[k], v):
                    raise EvaluationError(f"soup members disagree on the non-float tensor {k!r}")
                self.total[k] = v.clone()
            else:
                # float64 sums: the average of 30 fp32 checkpoints is exact to fp32 precision
                self.total[k] = self.total[k] + v.double() if self.count else v.double()
        self.count += 1

    def plus(self, state: Mapping[str, torch.Tensor]) -> SoupSum:
        """A new sum with ``state`` added (this one unchanged)."""
        out = SoupSum()
        out.total, out.count = dict(self.total), self.count
        out.add(state)
        return out

    def average(self, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The uniform average, in the dtypes of ``like`` (any member)."""
        if not self.count:
            raise EvaluationError("a soup needs at least one member")
        return {
            k: (v / self.count).to(like[k].dtype) if v.is_floating_point() else v.clone()
            for k, v in self.total.items()
        }


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


def iter_models(run: TrainingRun, entry: Mapping) -> Iterator[nn.Module]:
    """The model(s) a plan entry describes, built one at a time (an ensemble of big models never
    sits in memory at once): one for weight methods, several for prediction ensembles."""
    kind = entry["kind"]
    problems = {r.epoch: r.problem for r in run.checkpoints if not r.complete and r.epoch is not None}
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


def select_methods(
    run: TrainingRun,
    val_data: EncodedData,
    s: EvalSettings,
    *,
    k: int = 5,
    deltas: Sequence[int] = DEFAULT_DELTAS,
    rule: str = "spec",
) -> dict[str, dict]:
    """The plan: what every method is, decided from validation metrics only.

    ``val_data`` must be ``val_only(data)``; a data set that still has a "test"
    split is refused, so the test rows cannot leak into a choice.
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
    return {
        "crossover": {"kind": "crossover", "spots": spots},
        "crossover_ensemble": {
            "kind": "crossover_ensemble",
            "variants": {str(d): v for d, v in variant_spots(spots, deltas, sorted(run.complete)).items()},
        },
        "last": {"kind": "checkpoint", "epochs": [max(run.complete)]},
        "best_single": {"kind": "checkpoint", "epochs": [ranked[0]]},
        "uniform_soup": {"kind": "soup", "epochs": top},
        "greedy_soup": {"kind": "soup", "epochs": greedy_soup_epochs(run, ranked, val_data, s)},
        "topk_ensemble": {"kind": "checkpoint", "epochs": top},
    }


# ---------------------------------------------------------------------------
# Scoring the plan on the test split


def evaluate_methods(
    plan: Mapping[str, Mapping], run: TrainingRun, data: EncodedData, split: str, s: EvalSettings
) -> pd.DataFrame:
    """One row per method: its members and its scores on ``split``."""
    rows = []
    for method, entry in plan.items():
        preds = [predict(m, data, split, s) for m in iter_models(run, entry)]
        pred = preds[0] if len(preds) == 1 else average_predictions(preds)
        rows.append(
            {"method": method, "split": split, "members": _members(entry), **score(pred, data, split, s)}
        )
    return pd.DataFrame(rows)


def _members(entry: Mapping) -> str:
    if entry["kind"] == "crossover":
        return " ".join(f"{u}@{e}" for u, e in entry["spots"].items())
    if entry["kind"] == "crossover_ensemble":
        return " ".join(f"d{d}" for d in entry["variants"])
    return " ".join(f"epoch{e}" for e in entry["epochs"])


# ---------------------------------------------------------------------------
# Several seeds


def metric_columns(results: pd.DataFrame) -> list[str]:
    """The score columns of a results table (losses and task metrics)."""
    skip = {"method", "seed", "split", "members"}
    return [c for c in results.columns if c not in skip and pd.api.types.is_numeric_dtype(results[c])]


def aggregate_seeds(results: pd.DataFrame) -> pd.DataFrame:
    """Per method: number of seeds, and mean and sample std (ddof=1; NaN for one seed) of every score."""
    _check_results(results)
    cols = metric_columns(results)
    grouped = results.groupby("method", sort=False)[cols]
    mean = grouped.mean().add_suffix("_mean")
    std = grouped.std(ddof=1).add_suffix("_std")
    n = results.groupby("method", sort=False)["seed"].nunique().rename("n_seeds")
    out = pd.concat([n, mean, std], axis=1)
    return out[["n_seeds", *[c for col in cols for c in (f"{col}_mean", f"{col}_std")]]].reset_index()


def paired_differences(results: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Per method and score: mean and std over seeds of (method − baseline), paired by seed.

    A seed where either side is missing is left out of that pair, and ``n_pairs`` says how many remain.
    """
    _check_results(results)
    if baseline not in set(results["method"]):
        raise EvaluationError(
            f"baseline {baseline!r} is not among the methods {sorted(set(results['method']))}"
        )
    cols = metric_columns(results)
    wide = results.set_index(["seed", "method"])[cols]
    base = wide.xs(baseline, level="method")
    rows = []
    for method in results["method"].drop_duplicates():
        if method == baseline:
            continue
        diff = (wide.xs(method, level="method") - base).dropna(how="all")
        for col in cols:
            d = diff[col].dropna()
            rows.append(
                {
                    "method": method,
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
    dup = results.duplicated(subset=["method", "seed"])
    if dup.any():
        raise EvaluationError(
            f"results hold a method twice for one seed: {results.loc[dup, ['method', 'seed']].values.tolist()}"
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
