"""Phase 1: the LR sweep. Five learning rates x five epochs as Ray Tune trials, one at a time.

Selection (SPEC §3), lowest wins:
    score = mean(val_loss of the last 3 epochs) + 0.1 * |train_loss[-1] - val_loss[-1]|
Outputs under <output_root>/lr_sweep/: per-LR JSON and CSV, lr_sweep_all.csv (the
figure's data) and best_lr.json with every candidate's score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from ray.tune import TuneConfig, grid_search, loguniform

from tune.checkpoints import write_json_atomic
from tune.config import Config, output_root
from tune.runner import experiment_dir, experiment_state, fit, save_experiment_config
from tune.trainable import EPOCH_COLUMNS, selection_score

SWEEP_COLUMNS = EPOCH_COLUMNS


def sweep_dir(cfg: Config) -> Path:
    return output_root(cfg) / "lr_sweep"


def best_lr_path(cfg: Config) -> Path:
    return sweep_dir(cfg) / "best_lr.json"


@dataclass(frozen=True)
class Candidate:
    lr: float
    score: float
    history: pd.DataFrame  # one row per epoch, SWEEP_COLUMNS
    stopped_early: bool = False  # ASHA ended it before sweep.epochs: its score is not comparable


def select_lr(candidates: list[Candidate]) -> Candidate:
    """The lowest score wins; a non-finite score (a diverged trial) or one ASHA stopped early never does."""
    finite = [c for c in candidates if math.isfinite(c.score) and not c.stopped_early]
    if not finite:
        raise RuntimeError("every LR candidate diverged (non-finite scores); lower sweep.lrs")
    return min(finite, key=lambda c: (c.score, c.lr))


def _search_setup(cfg: Config) -> tuple[dict, TuneConfig]:
    s = cfg.sweep
    if s.search == "grid":
        return {"lr": grid_search(list(s.lrs))}, TuneConfig(max_concurrent_trials=1, num_samples=1)
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
        max_concurrent_trials=1,
    )
    return space, tc


def run_sweep(cfg: Config) -> Candidate:
    """Run (or finish, or reuse) the sweep experiment, write its outputs, return the chosen candidate."""
    path = experiment_dir(cfg, "sweep")
    state = experiment_state(path)
    resume = state is not None
    if resume:
        print(
            f"[sweep] found {path} ({len(state)} trials); finishing or reusing it rather than starting over"
        )
    else:
        save_experiment_config(cfg, path, "sweep")
    space, tune_config = _search_setup(cfg)
    results = fit(
        cfg, "sweep", param_space=space, tune_config=tune_config, epochs=cfg.sweep.epochs, resume=resume
    )
    candidates = []
    for r in results:
        df = r.metrics_dataframe
        df = (
            df.drop_duplicates("epoch", keep="last")
            .sort_values("epoch")[SWEEP_COLUMNS]
            .reset_index(drop=True)
        )
        lr = float(r.config["lr"])
        score = selection_score(df["train_loss"].tolist(), df["val_loss"].tolist(), cfg.sweep.overfit_weight)
        stopped = len(df) < cfg.sweep.epochs
        candidates.append(Candidate(lr=lr, score=score, history=df, stopped_early=stopped))
    candidates.sort(key=lambda c: c.lr)
    best = select_lr(candidates)
    write_sweep_outputs(cfg, candidates, best, path)
    return best


def write_sweep_outputs(cfg: Config, candidates: list[Candidate], best: Candidate, experiment: Path) -> None:
    out = sweep_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for c in candidates:
        stem = f"lr_{c.lr:.0e}"
        c.history.to_csv(out / f"{stem}.csv", index=False)
        write_json_atomic(
            out / f"{stem}.json",
            {"lr": c.lr, "score": c.score, "epochs": c.history.to_dict(orient="records")},
        )
    rows = pd.concat([c.history.assign(lr_peak=c.lr) for c in candidates], ignore_index=True)
    rows.to_csv(out / "lr_sweep_all.csv", index=False)
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
                    "score": c.score,
                    "epochs_run": len(c.history),
                    "stopped_early": c.stopped_early,
                    "final_train_loss": float(c.history["train_loss"].iloc[-1]),
                    "final_val_loss": float(c.history["val_loss"].iloc[-1]),
                    "final_val_acc": float(c.history["val_acc"].iloc[-1]),
                }
                for c in candidates
            ],
        },
    )
