"""Paired bootstrap intervals and McNemar's exact test (redheart_tune/analysis/uncertainty.py) on hand-made per-row values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from redheart_tune.analysis.uncertainty import (
    interval_table,
    mcnemar_agreeing,
    mcnemar_exact,
    resample_counts,
)


def test_mcnemar_exact_matches_the_binomial_test():
    base = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 1, np.nan], dtype=float)
    other = np.array([0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1], dtype=float)  # b = 5 (only base right), c = 1
    b, c, p = mcnemar_exact(base, other)
    assert (b, c) == (5, 1)
    assert p == pytest.approx(binomtest(1, 6, 0.5).pvalue)
    assert mcnemar_exact(base, base) == (0, 0, 1.0)
    assert mcnemar_exact(other, base)[2] == p  # two-sided: symmetric


def test_resamples_are_seeded_and_count_every_draw():
    a = np.concatenate(list(resample_counts(7, 1200, seed=3, chunk=500)))
    b = np.concatenate(list(resample_counts(7, 1200, seed=3, chunk=500)))
    assert a.shape == (1200, 7) and (a.sum(1) == 7).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, np.concatenate(list(resample_counts(7, 1200, seed=4))))


def _values(n: int, acc: dict[str, float], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    # Nested: a method with higher accuracy is right on every row the lower one is right on.
    return {
        m: {"emotion_accuracy": (u < a).astype(float), "regret_mae": np.full(n, 1 - a)}
        for m, a in acc.items()
    }


def test_intervals_cover_the_truth_and_pair_the_difference():
    values = {0: {"test": _values(4000, {"best_single": 0.70, "better": 0.73, "same": 0.70})}}
    t = interval_table(values, baseline="best_single", resamples=2000, seed=0).set_index(["method", "metric"])
    acc = t.loc[("better", "emotion_accuracy")]
    assert acc["ci_low"] < 0.73 < acc["ci_high"] and acc["ci_high"] - acc["ci_low"] < 0.04
    # Paired: the difference is about 0.03 and its interval far narrower than either method's own.
    assert acc["diff"] == pytest.approx(0.03, abs=0.01)
    assert acc["diff_high"] - acc["diff_low"] < acc["ci_high"] - acc["ci_low"]
    assert acc["diff_low"] > 0 and acc["mcnemar_p"] < 1e-6 and acc["mcnemar_c"] > 0 and acc["mcnemar_b"] == 0
    same = t.loc[("same", "emotion_accuracy")]
    assert same["diff"] == 0 and same["diff_low"] == 0 and same["diff_high"] == 0 and same["mcnemar_p"] == 1
    assert np.isnan(t.loc[("better", "regret_mae"), "mcnemar_p"])  # McNemar is for accuracies only
    again = interval_table(values, baseline="best_single", resamples=2000, seed=0)
    assert again.equals(t.reset_index()[again.columns])


def test_several_seeds_average_and_missing_targets_are_left_out():
    per_seed = {
        s: {"test": _values(500, {"best_single": 0.6, "m": 0.6 + 0.05 * s}, seed=s)} for s in range(3)
    }
    per_seed[0]["test"]["m"]["regret_mae"][:100] = np.nan  # no target on those rows
    per_seed[0]["test"]["best_single"]["regret_mae"][:100] = np.nan
    t = interval_table(per_seed, baseline="best_single", resamples=500, seed=1).set_index(
        ["method", "metric"]
    )
    row = t.loc[("m", "emotion_accuracy")]
    expected = np.mean([per_seed[s]["test"]["m"]["emotion_accuracy"].mean() for s in range(3)])
    assert row["n_seeds"] == 3 and row["value"] == pytest.approx(expected)
    assert len(row["mcnemar_p_each"].split()) == 3
    assert len(row["mcnemar_bc_each"].split()) == 3
    # Seed 0's "m" is the baseline itself (no discordant row): no evidence that every seed differs.
    assert row["mcnemar_bc_each"].split()[0] == "0/0" and row["mcnemar_p"] == 1
    assert t.loc[("m", "regret_mae"), "n_rows"] == 400
    with pytest.raises(ValueError, match="baseline 'nope'"):
        interval_table(per_seed, baseline="nope", resamples=100, seed=0)
    per_seed[2]["test"]["m"]["emotion_accuracy"] = np.zeros(10)
    with pytest.raises(ValueError, match="different lengths"):
        interval_table(per_seed, baseline="best_single", resamples=100, seed=0)
    per_seed[1] = {"holdout": per_seed[1]["test"]}
    with pytest.raises(ValueError, match="seed 1 has no per-row values of split 'test'"):
        interval_table(per_seed, baseline="best_single", resamples=100, seed=0)


def test_mcnemar_over_seeds_needs_every_seed_to_agree_in_direction():
    n = 5000
    base = np.zeros(n)
    better, worse = base.copy(), base.copy()
    better[:150] = 1.0  # 150 rows only the method gets right
    base_b = base.copy()
    base_b[:150] = 1.0  # seed 1: 150 rows only the baseline gets right
    values = {
        0: {"test": {"best_single": {"emotion_accuracy": base}, "m": {"emotion_accuracy": better}}},
        1: {"test": {"best_single": {"emotion_accuracy": base_b}, "m": {"emotion_accuracy": worse}}},
    }
    row = interval_table(values, baseline="best_single", resamples=200, seed=0).set_index("method").loc["m"]
    # Each seed alone is overwhelming (p ~ 1e-45), in opposite directions: together no evidence at all.
    assert [float(p) for p in row["mcnemar_p_each"].split()] == [pytest.approx(0, abs=1e-40)] * 2
    assert row["diff"] == 0 and row["mcnemar_bc_each"] == "0/150 150/0" and row["mcnemar_p"] == 1
    # Seeds that agree: the weakest seed decides; one seed is the two-sided exact test.
    assert mcnemar_agreeing([(2, 12, 0.0), (1, 20, 0.0)]) == pytest.approx(binomtest(12, 14, 0.5).pvalue)
    assert mcnemar_agreeing([(5, 1, 0.0)]) == pytest.approx(binomtest(1, 6, 0.5).pvalue)
    assert mcnemar_agreeing([(3, 3, 0.0)]) == 1.0
