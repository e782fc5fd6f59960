"""Phase 1 for real: the smoke sweep through Ray Tune, read back through Ray's public API."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from redheart_tune.layout import best_lr_path, experiment_dir, sweep_outputs_dir
from redheart_tune.tune.runner import ExperimentError
from redheart_tune.tune.sweep import Candidate, run_sweep, select_lr
from redheart_tune.tune.trainable import selection_score


def test_selection_rule_is_the_specs():
    # mean of the last 3 val losses + 0.1 * |train - val| at the last epoch
    assert selection_score([9, 9, 9, 0.5], [9, 1.0, 2.0, 3.0], 0.1) == pytest.approx(2.0 + 0.1 * 2.5)


def test_select_lr_ignores_diverged_and_breaks_ties_by_lower_lr():
    h = pd.DataFrame()
    cands = [
        Candidate(1e-3, math.nan, h),
        Candidate(1e-4, 0.5, h),
        Candidate(5e-5, 0.5, h),
        Candidate(1e-5, 0.7, h),
    ]
    assert select_lr(cands).lr == 5e-5
    with pytest.raises(RuntimeError, match="diverged"):
        select_lr([Candidate(1e-3, math.inf, h)])


def test_sweep_runs_five_trials_through_tune(smoke_cfg, ray_session):
    from ray.tune import ExperimentAnalysis

    from redheart_tune.config import cache_dir
    from redheart_tune.data import prepare_data

    lrs = [1e-5, 5e-5, 1e-4, 2e-4, 5e-4]
    cfg = smoke_cfg(f"sweep.lrs={lrs}", "sweep.epochs=3")
    prepare_data(cfg.data, cache_dir(cfg), show_progress=False)
    best = run_sweep(cfg).best

    chosen = json.loads(best_lr_path(cfg).read_text())
    assert chosen["best_lr"] == best.lr
    assert len(chosen["candidates"]) == 5
    assert best.score == min(c["score"] for c in chosen["candidates"])
    for c in chosen["candidates"]:
        csv = pd.read_csv(sweep_outputs_dir(cfg) / f"{c['trial']}.csv")
        assert list(csv["epoch"]) == [1, 2, 3]
        assert {
            "train_loss",
            "val_loss",
            "train_acc",
            "val_acc",
            "grad_norm",
            "peak_memory_mb",
            "epoch_time_s",
            "lr",
        } <= set(csv)
        assert json.loads((sweep_outputs_dir(cfg) / f"{c['trial']}.json").read_text())["lr"] == c["lr"]

    # Ray's own public API opens the experiment, in the run's own directory: 5 trials with per-epoch
    # DataFrames, each in a folder named by its full LR (Tune's default rounded 1e-5 to "lr=0.0000").
    exp = experiment_dir(cfg, "sweep")
    assert (
        exp == sweep_outputs_dir(cfg).parent / "sweep" == Path(cfg.run.output_root) / cfg.run.name / "sweep"
    )
    analysis = ExperimentAnalysis(str(exp))
    frames = analysis.trial_dataframes
    assert len(frames) == 5
    assert all(len(df) == 3 and df["val_loss"].notna().all() for df in frames.values())
    assert sorted(t.config["lr"] for t in analysis.trials) == lrs
    assert sorted(Path(t.path).name.split("_")[1] for t in analysis.trials) == sorted(
        f"{lr:.2e}" for lr in lrs
    )
    # TensorBoard events and progress.csv exist for every trial.
    for t in analysis.trials:
        files = {p.name for p in Path(t.path).iterdir()}
        assert "progress.csv" in files and "result.json" in files
        assert any(f.startswith("events.out.tfevents") for f in files)

    # A second run reuses the finished experiment instead of training again, also with settings that
    # do not change results (resources, cache location).
    again = run_sweep(smoke_cfg(f"sweep.lrs={lrs}", "sweep.epochs=3", "resources.cpus_per_trial=2")).best
    assert again.lr == best.lr and len(ExperimentAnalysis(str(exp)).trials) == 5

    # One that changes results is refused, naming the field and both values, and best_lr.json stays.
    before = best_lr_path(cfg).read_bytes()
    with pytest.raises(ExperimentError, match=r"sweep\.epochs: 3 stored, 4 now"):
        run_sweep(smoke_cfg(f"sweep.lrs={lrs}", "sweep.epochs=4"))
    with pytest.raises(ExperimentError, match=r"sweep\.lrs: \[1e-05, .*\] stored, \[0\.001\] now"):
        run_sweep(smoke_cfg("sweep.lrs=[1e-3]", "sweep.epochs=3"))
    assert best_lr_path(cfg).read_bytes() == before
    assert len(ExperimentAnalysis(str(exp)).trials) == 5


def test_optuna_search_with_asha(smoke_cfg, ray_session):
    """sweep.search: optuna samples LRs log-uniformly between the ends of sweep.lrs, trials one at a time."""
    from ray.tune import ExperimentAnalysis

    from redheart_tune.config import cache_dir
    from redheart_tune.data import prepare_data

    # LRs close together (optuna's 1.2e-4 and 1.4e-4 once shared the file lr_1e-04): each trial has its own.
    cfg = smoke_cfg(
        "sweep.search=optuna",
        "sweep.num_samples=3",
        "sweep.asha=true",
        "sweep.epochs=3",
        "sweep.lrs=[1e-4, 1.9e-4]",
    )
    prepare_data(cfg.data, cache_dir(cfg), show_progress=False)
    best = run_sweep(cfg).best
    chosen = json.loads(best_lr_path(cfg).read_text())
    assert chosen["search"] == "optuna" and len(chosen["candidates"]) == 3
    lo, hi = min(cfg.sweep.lrs), max(cfg.sweep.lrs)
    assert all(lo <= c["lr"] <= hi for c in chosen["candidates"])
    assert best.lr in {c["lr"] for c in chosen["candidates"]}
    trials = ExperimentAnalysis(str(experiment_dir(cfg, "sweep"))).trials
    assert len(trials) == 3
    per_trial = sorted(sweep_outputs_dir(cfg).glob("lr_*.json"))
    assert len(per_trial) == 3 and {json.loads(f.read_text())["lr"] for f in per_trial} == {
        t.config["lr"] for t in trials
    }


def test_a_diverging_lr_is_recorded_not_fatal(smoke_cfg, ray_session):
    from redheart_tune.config import cache_dir
    from redheart_tune.data import prepare_data

    cfg = smoke_cfg("sweep.lrs=[1e-3, 1e6]", "optim.grad_clip=0", "optim.warmup_ratio=0")
    prepare_data(cfg.data, cache_dir(cfg), show_progress=False)
    best = run_sweep(cfg).best
    chosen = json.loads(best_lr_path(cfg).read_text())
    assert best.lr == 1e-3
    diverged = [c for c in chosen["candidates"] if c["lr"] == 1e6][0]
    assert not math.isfinite(diverged["score"])
