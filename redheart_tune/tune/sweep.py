"""Phase 1: the LR sweep. Five learning rates x five epochs as Ray Tune trials, one at a time.

Selection, lowest wins:
    score = mean(val_loss of the last 3 epochs) + 0.1 * |train_loss[-1] - val_loss[-1]|
Outputs under <run dir>/lr_sweep/: per trial <trial name>.json and .csv (one row per
epoch) and best_lr.json with every candidate's score.  A finished sweep is reused,
an unfinished one resumed, either only with the config it was started with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from ray.tune import TuneConfig, grid_search, loguniform

from redheart_tune.config import Config
from redheart_tune.layout import best_lr_path, experiment_dir, sweep_outputs_dir
from redheart_tune.tune.recovery import ExperimentError
from redheart_tune.tune.resources import start_ray
from redheart_tune.tune.runner import dedupe_epochs, experiment_status, fit
from redheart_tune.tune.storage import pull
from redheart_tune.tune.stored_config import check_same_config, save_experiment_config
from redheart_tune.tune.trainable import EPOCH_COLUMNS, selection_score
from redheart_tune.util.files import write_json_atomic

SWEEP_COLUMNS = EPOCH_COLUMNS


@dataclass(frozen=True)
class Candidate:
    lr: float
    score: float
    history: pd.DataFrame  # one row per epoch, SWEEP_COLUMNS
    stopped_early: bool = False  # ASHA ended it before sweep.epochs: its score is not comparable
    trial: str = ""  # Tune's trial name (runner.trial_name), unique: the stem of its files


@dataclass(frozen=True)
class SweepResult:
    candidates: list[Candidate]  # sorted by LR
    best: Candidate

    def rows(self) -> pd.DataFrame:
        """Every candidate's epochs in one table (lr_peak, SWEEP_COLUMNS) with its selection score."""
        return pd.concat(
            [c.history.assign(lr_peak=c.lr, selection_score=c.score) for c in self.candidates],
            ignore_index=True,
        )


def select_lr(candidates: list[Candidate]) -> Candidate:
    """The lowest score wins; a non-finite score (a diverged trial) or one ASHA stopped early never does."""
    finite = [c for c in candidates if math.isfinite(c.score) and not c.stopped_early]
    if not finite:
        raise ExperimentError("every LR candidate diverged (non-finite scores); lower sweep.lrs")
    return min(finite, key=lambda c: (c.score, c.lr))


def _search_setup(cfg: Config) -> tuple[dict, TuneConfig]:
    s = cfg.sweep
    if s.search == "grid":
        return {"lr": grid_search(list(s.lrs))}, TuneConfig(
            max_concurrent_trials=s.max_concurrent, num_samples=1
        )
    from ray.tune.search.optuna import OptunaSearch

    scheduler = None
    if s.asha:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="epoch", max_t=s.epochs, grace_period=min(3, s.epochs))
    searcher = OptunaSearch(seed=cfg.run.seed)  # TPE by default
    space = {"lr": loguniform(min(s.lrs), max(s.lrs))}
    tc = TuneConfig(
        metric="score",
        mode="min",
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=s.num_samples,
        max_concurrent_trials=s.max_concurrent,
    )
    return space, tc


def run_sweep(cfg: Config) -> SweepResult:
    """Run (or finish, or reuse) the sweep experiment, write its outputs, return every candidate and the best."""
    path = pull(cfg, experiment_dir(cfg, "sweep"), weights=False)  # a remote root: its records first
    status = experiment_status(path)
    if status is None:
        save_experiment_config(cfg, path, "sweep")
    else:
        check_same_config(path, cfg, "sweep")
        what = "finished; reusing it" if status.finished else "unfinished; resuming it"
        print(f"[sweep] {path}: {what}")
    start_ray(cfg)
    space, tune_config = _search_setup(cfg)
    results = fit(
        cfg,
        "sweep",
        param_space=space,
        tune_config=tune_config,
        epochs=cfg.sweep.epochs,
        resume=status is not None,
    )
    candidates = []
    for r in results:
        df = dedupe_epochs(r.metrics_dataframe)[SWEEP_COLUMNS]
        score = selection_score(df["train_loss"].tolist(), df["val_loss"].tolist(), cfg.sweep.overfit_weight)
        stopped = len(df) < cfg.sweep.epochs
        candidates.append(
            Candidate(float(r.config["lr"]), score, df, stopped_early=stopped, trial=Path(r.path).name)
        )
    candidates.sort(key=lambda c: (c.lr, c.trial))
    sweep = SweepResult(candidates, select_lr(candidates))
    write_sweep_outputs(cfg, sweep, path)
    return sweep


def write_sweep_outputs(cfg: Config, sweep: SweepResult, experiment: Path) -> None:
    """Per trial <trial>.json and <trial>.csv, and best_lr.json; the figure and its CSV are drawn by the caller."""
    out = sweep_outputs_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for c in sweep.candidates:
        c.history.to_csv(out / f"{c.trial}.csv", index=False)
        write_json_atomic(
            out / f"{c.trial}.json",
            {"lr": c.lr, "trial": c.trial, "score": c.score, "epochs": c.history.to_dict(orient="records")},
        )
    best = sweep.best
    write_json_atomic(
        best_lr_path(cfg),
        {
            "best_lr": best.lr,
            "best_score": best.score,
            "rule": f"mean(val_loss[-3:]) + {cfg.sweep.overfit_weight} * |train_loss[-1] - val_loss[-1]|",
            "search": cfg.sweep.search,
            "epochs": cfg.sweep.epochs,
            "experiment": str(experiment),
            "candidates": [
                {
                    "lr": c.lr,
                    "trial": c.trial,
                    "score": c.score,
                    "epochs_run": len(c.history),
                    "stopped_early": c.stopped_early,
                    "final_train_loss": float(c.history["train_loss"].iloc[-1]),
                    "final_val_loss": float(c.history["val_loss"].iloc[-1]),
                    "final_val_acc": float(c.history["val_acc"].iloc[-1]),
                }
                for c in sweep.candidates
            ],
        },
    )
