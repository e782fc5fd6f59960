"""``python run.py status``: where a run stands (sweep, training, analysis) and the command that comes next.

Everything is read through Ray's public API (``ExperimentAnalysis``, ``ResultGrid``)
and the files the stages write; nothing needs Ray to be running.
"""

from __future__ import annotations

import json
import math

from ray.tune.experiment import Trial

from analysis.pipeline import CROSSOVER_FILE, RESULTS_FILE, SWEET_SPOTS_FILE
from tune.config import Config
from tune.layout import analysis_dir, best_lr_path, experiment_dir, final_dir, run_dir
from tune.runner import (
    NOT_READ_BY,
    ExperimentStatus,
    config_differences,
    dedupe_epochs,
    experiment_status,
    load_experiment_config,
    newest_checkpoint_epoch,
)


def _differences(stored: Config, cfg: Config, stage: str) -> list[str]:
    diffs = config_differences(stored, cfg, NOT_READ_BY[stage])
    if not diffs:
        return []
    listed = "; ".join(f"{key}: {old!r} there, {new!r} given" for key, old, new in diffs)
    return [f"    differs from the given config ({listed}): reusing it with this config is refused"]


def _sweep_lines(status: ExperimentStatus, cfg: Config) -> list[str]:
    stored, _ = load_experiment_config(status.path)
    states = list(status.trials.values())
    done = sum(s == Trial.TERMINATED for s in states)
    lines = [
        f"  sweep     {status.path}: {'finished' if status.finished else 'unfinished'}, {done} of {len(states)} trials done"
    ]
    best = best_lr_path(cfg)
    if status.finished and best.is_file():
        record = json.loads(best.read_text())
        for c in record["candidates"]:
            score = f"score {c['score']:.4f}" if math.isfinite(c["score"]) else "diverged"
            mark = "  <- chosen" if c["lr"] == record["best_lr"] else ""
            lines.append(
                f"    lr {c['lr']:.2e}: {c['epochs_run']} epochs, {score}, final val acc {c['final_val_acc']:.3f}{mark}"
            )
        lines.append(
            f"    chosen LR {record['best_lr']:.2e} in {best}; figure {best.parent / 'lr_sweep.png'}"
        )
    elif status.analysis is not None:
        frames = status.analysis.trial_dataframes
        for trial in status.analysis.trials:
            df = frames.get(trial.trial_id)
            epochs = 0 if df is None or df.empty else int(dedupe_epochs(df)["epoch"].max())
            lines.append(
                f"    lr {trial.config['lr']:.2e}: {epochs}/{stored.sweep.epochs} epochs, {trial.status}"
            )
    return lines + _differences(stored, cfg, "sweep")


def _train_lines(status: ExperimentStatus, cfg: Config) -> list[str]:
    stored, _ = load_experiment_config(status.path)
    total = stored.train.epochs
    results = status.results
    if results is None or not len(results):
        return [f"  training  {status.path}: started, no trial yet"]
    result, state = results[0], next(iter(status.trials.values()))
    lines = [f"  training  {status.path}: {state}, peak LR {stored.optim.lr:.2e}"]
    df = result.metrics_dataframe
    # A driver killed right after a checkpoint leaves Tune's record behind what is on disk: the
    # checkpoints themselves say how far the run got (and where a resume starts).
    on_disk = newest_checkpoint_epoch(status.path)
    if df is not None and not df.empty:
        last = dedupe_epochs(df).iloc[-1]
        epoch = max(int(last["epoch"]), on_disk)
        lag = f" (Tune's record reaches epoch {int(last['epoch'])})" if epoch > int(last["epoch"]) else ""
        lines.append(
            f"    epoch {epoch}/{total} ({100 * epoch / total:.0f} %){lag}, val loss {last['val_loss']:.4f}, "
            f"val acc {last['val_acc']:.3f}, peak memory {last['peak_memory_mb']:.0f} MB ({last['memory_kind']})"
        )
    elif on_disk:
        lines.append(f"    epoch {on_disk}/{total} ({100 * on_disk / total:.0f} %) by its newest checkpoint")
    checkpoints = result.best_checkpoints or []
    latest = result.checkpoint.path if result.checkpoint else "-"
    lines.append(
        f"    checkpoints: {len(checkpoints)} in Tune's record, latest {latest}; newest on disk: epoch {on_disk}"
    )
    if result.error is not None:
        message = str(result.error).strip().splitlines()
        lines.append(f"    ERROR: {message[-1] if message else type(result.error).__name__}")
    return lines + _differences(stored, cfg, "train")


def run_status(cfg: Config, command: str) -> list[str]:
    """Lines on run ``cfg.run.name``; ``command`` (the config file and overrides given) goes into the next step."""
    sweep = experiment_status(experiment_dir(cfg, "sweep"))
    train = experiment_status(experiment_dir(cfg, "train"))
    lines = [f"[status] run {cfg.run.name!r} in {run_dir(cfg)}"]
    lines += _sweep_lines(sweep, cfg) if sweep else ["  sweep     not started"]
    lines += _train_lines(train, cfg) if train else ["  training  not started"]
    steps = [
        ("analyze", analysis_dir(cfg) / SWEET_SPOTS_FILE),
        ("crossover", final_dir(cfg) / CROSSOVER_FILE),
        ("report", analysis_dir(cfg) / RESULTS_FILE),
    ]
    done = [name for name, f in steps if f.is_file()]
    if train is not None:
        lines.append(f"  analysis  done: {', '.join(done) or 'none'}")
    return [*lines, f"[status] next: {next_step(cfg, sweep, train, steps, command)}"]


def next_step(cfg: Config, sweep, train, steps, command: str) -> str:
    tail = f" {command}" if command else ""
    if train is None:
        if sweep is None:
            return f"python run.py sweep{tail}  (or: python run.py all{tail})"
        if not sweep.finished:
            return f"python run.py resume {sweep.path}  (once no driver runs it any more)"
        return f"python run.py train{tail}"
    if not train.finished:
        return f"python run.py resume {train.path}  (once no driver runs it any more; fix the error first, if any)"
    for name, f in steps:
        if not f.is_file():
            return f"python run.py {name}{tail}"
    return f"nothing: every stage is done; results in {steps[-1][1]}"
