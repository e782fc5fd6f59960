"""Selection: what every method is, decided on validation data only (``select_methods``).

Which epochs, which sweet spots, which soup members and which fusion weights each method of
``analysis.evaluate.METHODS`` uses come from the checkpoints' recorded validation metrics and, for the
greedy soups and the learned fusion, from passes over ``val_only(data)``: no test row and no row of the
second held-out set can reach a choice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from redheart_tune.analysis.crossover import DEFAULT_DELTAS, build_crossover, variant_spots
from redheart_tune.analysis.evaluate import (
    EvalSettings,
    EvaluationError,
    predict,
    predict_modules,
    unit_val_loss,
)
from redheart_tune.analysis.experiment import TrainingRun
from redheart_tune.analysis.fusion import learn_fusion_weights
from redheart_tune.analysis.soups import SoupSum, window_members
from redheart_tune.analysis.sweet_spots import select_sweet_spots, unit_scores
from redheart_tune.analysis.weights import (
    broken_epochs,
    check_compatible,
    load_unit,
    model_for_state,
    set_unit_tensors,
)
from redheart_tune.data import EncodedData
from redheart_tune.engine.checkpoints import load_model_state
from redheart_tune.model.groups import selection_units


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
