"""The sweet-spot rule on hand-made tables: no Ray, no files."""

from __future__ import annotations

import pandas as pd
import pytest

from redheart_tune.analysis.sweet_spots import (
    RULES,
    SweetSpotError,
    best_epoch,
    overfit_penalty,
    select_sweet_spots,
    sweet_spot_report,
)
from redheart_tune.model.groups import GROUPS, SelectionUnit, selection_units

GROUP_C = SelectionUnit("group_c", "group_c", GROUPS["group_c"])
PHASE0 = SelectionUnit("phase0", "independent", ("phase0",))


def table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def row(epoch, train, val, **module_losses) -> dict:
    return {
        "epoch": epoch,
        "train_loss": train,
        "val_loss": val,
        **{f"val_loss/{m}": v for m, v in module_losses.items()},
    }


def test_penalty_threshold_is_strictly_greater_than_half():
    train = pd.Series([1.0, 1.0, 1.0])
    val = pd.Series([1.5, 1.5 + 1e-9, 0.4])
    pen = overfit_penalty(train, val)
    assert pen[0] == 0.0  # gap exactly 0.5: no penalty
    assert pen[1] == pytest.approx(0.1 * (0.5 + 1e-9))
    assert pen[2] == pytest.approx(0.06)  # |1.0 - 0.4| = 0.6 > 0.5, either sign


def test_linked_group_mean_plus_penalty():
    # epoch 2: mean 1.0, gap 0.5 (no penalty) -> 1.0
    # epoch 4: mean 0.96, gap 0.6 -> 0.96 + 0.06 = 1.02
    t = table([row(2, 1.0, 1.5, dsp=0.9, kalman=1.1), row(4, 1.0, 1.6, dsp=0.92, kalman=1.0)])
    assert best_epoch(t, GROUP_C, "spec") == 2
    assert best_epoch(t, GROUP_C, "min_val_loss") == 4  # the rules differ exactly where the penalty matters


def test_gap_just_at_threshold_does_not_flip_choice():
    t = table([row(2, 0.5, 1.0, dsp=1.0, kalman=1.0), row(4, 0.5, 1.0, dsp=0.99, kalman=1.0)])
    assert best_epoch(t, GROUP_C, "spec") == 4


def test_ties_go_to_the_earliest_epoch():
    t = table([row(e, 1.0, 1.0, dsp=0.5, kalman=0.5, phase0=0.3) for e in (8, 2, 6, 4)])
    assert best_epoch(t, GROUP_C) == 2
    assert best_epoch(t, PHASE0) == 2


def test_independent_module_has_no_penalty():
    # A huge train/val gap at epoch 4 would penalise a group, but phase0 takes its own lowest loss.
    t = table([row(2, 1.0, 1.0, phase0=0.5), row(4, 0.0, 3.0, phase0=0.4)])
    assert best_epoch(t, PHASE0, "spec") == 4


def test_missing_and_non_positive_module_losses_use_those_present():
    # epoch 2: kalman absent (NaN) -> mean of dsp alone = 0.8; epoch 4: kalman 0 is "not measured" -> 0.9.
    t = table(
        [
            row(2, 1.0, 1.0, dsp=0.8),
            row(4, 1.0, 1.0, dsp=0.9, kalman=0.0),
            row(6, 1.0, 1.0, dsp=1.0, kalman=0.7),
        ]
    )
    assert t.loc[0, "val_loss/kalman"] != t.loc[0, "val_loss/kalman"]  # NaN in the frame
    assert best_epoch(t, GROUP_C) == 2


def test_a_unit_without_data_is_a_clear_error():
    t = table([row(2, 1.0, 1.0, dsp=0.8)])
    with pytest.raises(SweetSpotError, match=r"unit 'phase0'.*val_loss/phase0"):
        best_epoch(t, PHASE0)
    t = table([row(2, 1.0, 1.0, phase0=0.0)])  # only a placeholder zero
    with pytest.raises(SweetSpotError, match="phase0"):
        best_epoch(t, PHASE0)


def test_bad_tables_are_refused():
    with pytest.raises(SweetSpotError, match="lacks column"):
        select_sweet_spots(pd.DataFrame({"epoch": [2]}))
    with pytest.raises(SweetSpotError, match="more than once"):
        select_sweet_spots(table([row(2, 1, 1, dsp=1), row(2, 1, 1, dsp=1)]))
    with pytest.raises(KeyError, match="unknown sweet-spot rule 'best'"):
        select_sweet_spots(table([row(2, 1, 1, dsp=1)]), rule="best")


def full_table() -> pd.DataFrame:
    """Every declared module present; unit i is best at epoch 2 * (i % 5 + 1)."""
    rows = []
    for e in (2, 4, 6, 8, 10):
        losses = {}
        for i, u in enumerate(selection_units()):
            best = 2 * (i % 5 + 1)
            for m in u.modules:
                losses[m] = 1.0 + abs(e - best) * 0.1
        rows.append(row(e, 1.0, 1.0, **losses))
    return table(rows)


def test_select_every_unit_from_the_declaration():
    spots = select_sweet_spots(full_table())
    assert list(spots) == [u.name for u in selection_units()]
    assert spots == {u.name: 2 * (i % 5 + 1) for i, u in enumerate(selection_units())}
    assert set(RULES) == {"spec", "min_val_loss"}


def test_report_fields():
    t = full_table()
    spots = select_sweet_spots(t)
    details = {
        e: {
            "grad_stats": {"dsp.w": {"norm": 2.0}, "kalman.q": {"norm": 4.0}, "phase0.w": {"norm": 1.0}},
            "weight_stats": {"dsp.w": {"sparsity": 0.1}, "kalman.q": {"sparsity": 0.3}},
        }
        for e in t["epoch"]
    }
    rep = sweet_spot_report(t, spots, details)
    c = rep["units"]["group_c"]
    assert c["best_epoch"] == spots["group_c"]
    assert c["grad_norm"] == {"mean": 3.0, "max": 4.0, "min": 2.0}
    assert c["mean_weight_sparsity"] == pytest.approx(0.2)
    assert c["overfit_score"] == 0.0
    assert rep["units"]["phase1"]["grad_norm"] is None  # nothing recorded: None, not a made-up number
    assert rep["plot"]["epochs"] == [2, 4, 6, 8, 10]
    assert rep["sweet_spots"] == spots
