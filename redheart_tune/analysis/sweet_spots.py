"""Phase 3: each selection unit's sweet-spot epoch, as pure functions on a table.

The input is the *checkpoint table*: one row per checkpoint epoch with the
columns ``epoch``, ``train_loss``, ``val_loss`` and ``val_loss/<module>`` (the
flat keys every checkpoint's metrics.json and every Tune result row carry).
Nothing here opens a file or needs Ray, so the rule is tested on hand-made
tables.  The units (linked groups, independent modules) come from
``model.groups.selection_units()``; no module name is listed here.

    spots = select_sweet_spots(table)                      # {"group_a": 14, ..., "phase2": 8}
    spots = select_sweet_spots(table, rule="min_val_loss")

Every value is a *validation* loss: the test split never reaches this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from redheart_tune.model.groups import SelectionUnit, param_prefix_owner, selection_units

# A linked group pays 0.1 * |train - val| once that gap exceeds 0.5.
OVERFIT_GAP_THRESHOLD = 0.5
OVERFIT_PENALTY_WEIGHT = 0.1


class SweetSpotError(ValueError):
    """The table cannot answer the question (a unit without data, a missing column); the message says which."""


def module_column(module: str) -> str:
    """The table column holding a module's validation loss."""
    return f"val_loss/{module}"


# ---------------------------------------------------------------------------
# Rules: score of every epoch for one unit (lower is better).  Picked by name through RULES.


def overfit_penalty(train_loss: pd.Series, val_loss: pd.Series) -> pd.Series:
    """``0.1 * |train - val|`` where that gap is strictly greater than 0.5, else 0."""
    gap = (train_loss - val_loss).abs()
    return (OVERFIT_PENALTY_WEIGHT * gap).where(gap > OVERFIT_GAP_THRESHOLD, 0.0)


def spec_rule(
    unit: SelectionUnit, unit_loss: pd.Series, train_loss: pd.Series, val_loss: pd.Series
) -> pd.Series:
    """A linked group scores its mean module loss plus the overfit penalty; an
    independent module scores its own loss (the spec gives it no penalty)."""
    if unit.group == "independent":
        return unit_loss
    return unit_loss + overfit_penalty(train_loss, val_loss)


def min_val_loss_rule(
    unit: SelectionUnit, unit_loss: pd.Series, train_loss: pd.Series, val_loss: pd.Series
) -> pd.Series:
    """The plain minimum of the unit's mean module loss, no penalty (an ablation of the spec's rule)."""
    return unit_loss


Rule = Callable[[SelectionUnit, pd.Series, pd.Series, pd.Series], pd.Series]
RULES: dict[str, Rule] = {"spec": spec_rule, "min_val_loss": min_val_loss_rule}


def get_rule(name: str) -> Rule:
    if name not in RULES:
        raise KeyError(f"unknown sweet-spot rule {name!r}; known: {', '.join(RULES)}")
    return RULES[name]


# ---------------------------------------------------------------------------
# Selection


def _check_table(table: pd.DataFrame) -> pd.DataFrame:
    """Sorted by epoch, one row per epoch, the three required columns present."""
    missing = [c for c in ("epoch", "train_loss", "val_loss") if c not in table.columns]
    if missing:
        raise SweetSpotError(
            f"checkpoint table lacks column(s) {missing}; it needs epoch, train_loss, val_loss and "
            "val_loss/<module> (the flat keys of each checkpoint's metrics.json)"
        )
    if table.empty:
        raise SweetSpotError("checkpoint table is empty: no complete checkpoint to choose from")
    dup = table["epoch"][table["epoch"].duplicated()].tolist()
    if dup:
        raise SweetSpotError(
            f"checkpoint table has epoch(s) {dup} more than once; keep one row per checkpoint"
        )
    return table.sort_values("epoch").set_index("epoch", drop=False)


def unit_loss(table: pd.DataFrame, unit: SelectionUnit) -> pd.Series:
    """Per epoch: mean validation loss of the unit's modules, counting only losses > 0.

    A loss that is missing (no column, NaN) or not positive counts as "not
    measured" (0 stands for no measurement, never for a perfect fit), so the mean is over the
    modules that were measured; an epoch where none was is NaN.
    """
    columns = [module_column(m) for m in unit.modules if module_column(m) in table.columns]
    if not columns:
        return pd.Series(np.nan, index=table.index, dtype=float)
    losses = table[columns].astype(float)
    return losses.where(losses > 0).mean(axis=1, skipna=True)


def unit_scores(table: pd.DataFrame, unit: SelectionUnit, rule: str = "spec") -> pd.DataFrame:
    """Per epoch: the unit's mean module loss, the rule's score, and whether the epoch is a candidate."""
    table = _check_table(table)
    loss = unit_loss(table, unit)
    score = get_rule(rule)(unit, loss, table["train_loss"].astype(float), table["val_loss"].astype(float))
    return pd.DataFrame({"epoch": table["epoch"], "unit_loss": loss, "score": score}).reset_index(drop=True)


def best_epoch(table: pd.DataFrame, unit: SelectionUnit, rule: str = "spec") -> int:
    """The epoch with the lowest score; ties go to the earliest epoch."""
    scores = unit_scores(table, unit, rule).dropna(subset=["score"])
    if scores.empty:
        wanted = ", ".join(module_column(m) for m in unit.modules)
        raise SweetSpotError(
            f"unit {unit.name!r}: no checkpoint has a positive validation loss for any of its modules "
            f"(columns {wanted}); check that training reported per-module losses"
        )
    # The table is sorted by epoch and idxmin returns the first minimum: the earliest epoch wins a tie.
    return int(scores.loc[scores["score"].idxmin(), "epoch"])


def select_sweet_spots(
    table: pd.DataFrame, rule: str = "spec", units: tuple[SelectionUnit, ...] | None = None
) -> dict[str, int]:
    """``{unit name: epoch}`` for every selection unit (linked groups first, then independent modules)."""
    get_rule(rule)  # an unknown name fails before any work
    return {u.name: best_epoch(table, u, rule) for u in units or selection_units()}


# ---------------------------------------------------------------------------
# Report (for the paper)


def _unit_params(
    stats: Mapping[str, Mapping[str, float]], unit: SelectionUnit
) -> dict[str, Mapping[str, float]]:
    return {name: s for name, s in stats.items() if param_prefix_owner(name) in unit.modules}


def grad_norm_summary(grad_stats: Mapping[str, Mapping[str, float]], unit: SelectionUnit) -> dict | None:
    """Mean, max and min of the unit's per-parameter gradient norms (None when none was recorded)."""
    norms = [s["norm"] for s in _unit_params(grad_stats, unit).values()]
    if not norms:
        return None
    return {"mean": float(np.mean(norms)), "max": float(np.max(norms)), "min": float(np.min(norms))}


def mean_weight_sparsity(
    weight_stats: Mapping[str, Mapping[str, float]], unit: SelectionUnit
) -> float | None:
    """Mean over the unit's parameters of the share of |w| < 1e-6 (None when none was recorded)."""
    values = [s["sparsity"] for s in _unit_params(weight_stats, unit).values()]
    return float(np.mean(values)) if values else None


def sweet_spot_report(
    table: pd.DataFrame,
    spots: Mapping[str, int],
    details: Mapping[int, Mapping],
    rule: str = "spec",
    units: tuple[SelectionUnit, ...] | None = None,
) -> dict:
    """The paper's sweet-spot record: per unit its epoch, losses, overfit score, gradient and sparsity summary.

    ``details`` maps epoch -> that checkpoint's metrics.json (for ``grad_stats``
    and ``weight_stats``).  A checkpoint without them gives ``None`` there, never
    an invented number.
    """
    checked = _check_table(table)
    units = units or selection_units()
    per_unit = {}
    for unit in units:
        epoch = spots[unit.name]
        row = checked.loc[epoch]
        detail = details.get(epoch, {})
        scores = unit_scores(table, unit, rule).set_index("epoch")
        per_unit[unit.name] = {
            "group": unit.group,
            "modules": list(unit.modules),
            "best_epoch": int(epoch),
            "score": float(scores.loc[epoch, "score"]),
            "unit_val_loss": float(scores.loc[epoch, "unit_loss"]),
            "train_loss": float(row["train_loss"]),
            "val_loss": float(row["val_loss"]),
            "overfit_score": float(row["train_loss"] - row["val_loss"]),
            "grad_norm": grad_norm_summary(detail.get("grad_stats") or {}, unit),
            "mean_weight_sparsity": mean_weight_sparsity(detail.get("weight_stats") or {}, unit),
        }
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "rule": rule,
        "sweet_spots": {u.name: int(spots[u.name]) for u in units},
        "units": per_unit,
        "plot": {
            "epochs": [int(e) for e in checked["epoch"]],
            "train_loss": [float(x) for x in checked["train_loss"]],
            "val_loss": [float(x) for x in checked["val_loss"]],
            "unit_loss": {u.name: [_none_if_nan(x) for x in unit_loss(checked, u)] for u in units},
            "sweet_spots": {u.name: int(spots[u.name]) for u in units},
        },
    }


def _none_if_nan(x: float) -> float | None:
    return None if pd.isna(x) else float(x)
