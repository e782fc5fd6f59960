"""Aggregation of results.csv rows over seeds (pure pandas and numpy, no Ray, no model)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from redheart_tune.analysis.evaluate import EvaluationError
from redheart_tune.analysis.seeds import aggregate_seeds, paired_differences, read_results, save_row_scores


def results() -> pd.DataFrame:
    rows = []
    for seed, (best, cross) in enumerate([(0.60, 0.65), (0.70, 0.71), (0.50, 0.58)]):
        rows.append(
            {
                "method": "best_single",
                "seed": seed,
                "split": "test",
                "members": "epoch4",
                "emotion_accuracy": best,
                "fused_loss": 1.0,
            }
        )
        rows.append(
            {
                "method": "crossover",
                "seed": seed,
                "split": "test",
                "members": "...",
                "emotion_accuracy": cross,
                "fused_loss": 0.9,
            }
        )
    return pd.DataFrame(rows)


def test_mean_and_std_over_seeds():
    s = aggregate_seeds(results()).set_index("method")
    assert s.loc["crossover", "n_seeds"] == 3
    assert s.loc["best_single", "emotion_accuracy_mean"] == pytest.approx(0.6)
    assert s.loc["best_single", "emotion_accuracy_std"] == pytest.approx(0.1)  # sample std (ddof=1)
    assert "members_mean" not in s.columns and "seed_mean" not in s.columns


def test_single_seed_has_no_std():
    s = aggregate_seeds(results().query("seed == 0")).set_index("method")
    assert math.isnan(s.loc["crossover", "emotion_accuracy_std"])


def test_paired_difference_against_best_single():
    d = paired_differences(results()).set_index(["method", "metric"])
    acc = d.loc[("crossover", "emotion_accuracy")]
    assert acc["n_pairs"] == 3
    assert acc["mean_diff"] == pytest.approx((0.05 + 0.01 + 0.08) / 3)
    assert acc["std_diff"] == pytest.approx(pd.Series([0.05, 0.01, 0.08]).std())
    assert d.loc[("crossover", "fused_loss"), "mean_diff"] == pytest.approx(-0.1)
    assert "best_single" not in d.index.get_level_values("method")


def test_pairs_only_where_both_sides_exist():
    r = results()
    r = r[~((r["method"] == "best_single") & (r["seed"] == 2))]
    d = paired_differences(r).set_index(["method", "metric"])
    assert d.loc[("crossover", "emotion_accuracy"), "n_pairs"] == 2


def test_bad_inputs(tmp_path):
    r = results()
    with pytest.raises(EvaluationError, match="twice for one seed"):
        aggregate_seeds(pd.concat([r, r.iloc[:1]]))
    with pytest.raises(EvaluationError, match="baseline 'last'"):
        paired_differences(r, baseline="last")
    with pytest.raises(EvaluationError, match="no such results file"):
        read_results([tmp_path / "missing.csv"])
    r.to_csv(tmp_path / "a.csv", index=False)
    assert len(read_results([tmp_path / "a.csv"])) == len(r)


def test_two_splits_are_aggregated_apart():
    r = results()
    both = pd.concat([r, r.assign(split="holdout", emotion_accuracy=r["emotion_accuracy"] + 0.1)])
    s = aggregate_seeds(both).set_index(["method", "split"])
    assert s.loc[("best_single", "holdout"), "emotion_accuracy_mean"] == pytest.approx(0.7)
    assert s.loc[("best_single", "test"), "emotion_accuracy_mean"] == pytest.approx(0.6)
    d = paired_differences(both).set_index(["method", "split", "metric"])
    assert d.loc[("crossover", "holdout", "emotion_accuracy"), "mean_diff"] == pytest.approx(0.14 / 3)
    with pytest.raises(EvaluationError, match="twice for one seed"):
        aggregate_seeds(pd.concat([both, both.iloc[:1]]))


def test_summarize_seeds_writes_tables_intervals_and_figure(tmp_path):
    from redheart_tune.pipeline import summarize_seeds

    r = results()
    rng = np.random.default_rng(0)
    files = []
    for seed, part in r.groupby("seed"):
        files.append(tmp_path / f"seed{seed}" / "results.csv")
        files[-1].parent.mkdir()
        part.to_csv(files[-1], index=False)
        rows = {
            m: {"emotion_accuracy": (rng.random(50) < 0.6).astype(float)}
            for m in ("best_single", "crossover")
        }
        save_row_scores(
            files[-1].with_name("row_scores.npz"), {"test": rows}, {"test": [f"r{i}" for i in range(50)]}
        )
    out = summarize_seeds(files, tmp_path / "summary", resamples=200)
    assert set(out["summary"]["method"]) == {"best_single", "crossover"}
    for name in (
        "results_all_seeds.csv",
        "results_summary.csv",
        "paired_differences.csv",
        "intervals_summary.csv",
        "methods_emotion_accuracy.png",
    ):
        assert (tmp_path / "summary" / name).stat().st_size > 0
    intervals = pd.read_csv(tmp_path / "summary" / "intervals_summary.csv")
    assert set(intervals["n_seeds"]) == {3} and set(intervals["n_rows"]) == {50}
    assert len(pd.read_csv(tmp_path / "summary" / "methods_emotion_accuracy.csv")) == 2

    # Seeds scored on other sentences cannot be paired.
    save_row_scores(
        files[2].with_name("row_scores.npz"), {"test": rows}, {"test": [f"x{i}" for i in range(50)]}
    )
    with pytest.raises(EvaluationError, match="other sentences"):
        summarize_seeds(files, tmp_path / "summary", resamples=200)


def test_one_seeds_summary_beside_its_results_repeats_no_file(tmp_path):
    """A one-seed report summarises into its own analysis folder: results_all_seeds.csv and
    intervals_summary.csv would be copies of its results.csv and intervals.csv there."""
    from redheart_tune.pipeline import summarize_seeds

    f = tmp_path / "analysis" / "results.csv"
    f.parent.mkdir()
    results()[lambda r: r["seed"] == 0].to_csv(f, index=False)
    rows = {m: {"emotion_accuracy": np.ones(20)} for m in ("best_single", "crossover")}
    save_row_scores(f.with_name("row_scores.npz"), {"test": rows}, {"test": [f"r{i}" for i in range(20)]})

    out = summarize_seeds([f], f.parent, resamples=50)
    assert set(out["intervals"]["n_seeds"]) == {1}  # the intervals are still returned (and printed)
    written = {p.name for p in f.parent.iterdir()}
    assert {"results_summary.csv", "paired_differences.csv", "methods_emotion_accuracy.png"} <= written
    assert not written & {"results_all_seeds.csv", "intervals_summary.csv"}

    summarize_seeds([f], tmp_path / "elsewhere", resamples=50)  # nothing beside it to repeat: all written
    assert {"results_all_seeds.csv", "intervals_summary.csv"} <= {
        p.name for p in (tmp_path / "elsewhere").iterdir()
    }
