"""Open a finished (or interrupted) training experiment: Tune's records plus each checkpoint's own metrics.

Everything comes from Ray Tune's public reading API (``ExperimentAnalysis``,
wrapped in a ``ResultGrid``; neither needs ``ray.init`` nor the trainable) and
from the checkpoints' metrics.json / meta.json, verified against their
manifests.  No log is scraped.

    run = load_training_run("runs/redheart/train")
    run.epochs              # one row per epoch (resume duplicates dropped, the last kept)
    run.checkpoint_table    # one row per complete checkpoint: epoch, train_loss, val_loss, val_loss/<module>, ...
    run.modules             # one row per checkpoint x module: epoch, module, group, unit, task, val_loss, val_metric
    run.checkpoints         # every checkpoint folder found, complete or with the reason it is not
    run.complete            # {epoch: path} of the checkpoints analysis may use
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from redheart_tune.engine.checkpoints import CheckpointError, CheckpointInfo, verify_checkpoint
from redheart_tune.layout import CONFIG_FILE
from redheart_tune.model.groups import GROUP_OF, MODULE_TASK, selection_units
from redheart_tune.tune.runner import dedupe_epochs


class ExperimentReadError(RuntimeError):
    """The folder is not a readable training experiment; the message names the path and what to do."""


class IncompleteCheckpointWarning(UserWarning):
    """A checkpoint folder is missing, truncated or corrupt; it is left out of every selection."""


@dataclass(frozen=True)
class CheckpointRecord:
    """One checkpoint folder of the trial, usable or not."""

    path: Path
    epoch: int | None  # from meta.json, else from Tune's record; None when neither says
    complete: bool
    problem: str | None = None  # why it is not usable (the CheckpointError's message)
    in_tune_record: bool = True  # False: on disk but not in Tune's experiment snapshot


@dataclass
class TrainingRun:
    """A training experiment as tidy tables; see the module docstring."""

    path: Path
    trial_path: Path
    status: str
    epochs: pd.DataFrame
    checkpoint_table: pd.DataFrame
    modules: pd.DataFrame
    checkpoints: list[CheckpointRecord]
    details: dict[int, dict] = field(repr=False)  # epoch -> metrics.json of a complete checkpoint
    meta: dict[int, dict] = field(repr=False)  # epoch -> meta.json of a complete checkpoint
    config: dict | None = field(default=None, repr=False)  # redheart_config.json's "config", when present

    @property
    def complete(self) -> dict[int, Path]:
        """Epoch -> folder of every usable checkpoint, sorted by epoch."""
        return {r.epoch: r.path for r in sorted(self.checkpoints, key=_epoch_key) if r.complete}

    @property
    def problems(self) -> dict[Path, str]:
        return {r.path: r.problem for r in self.checkpoints if not r.complete}


def _epoch_key(r: CheckpointRecord) -> tuple[int, str]:
    return (r.epoch if r.epoch is not None else -1, r.path.name)


# ---------------------------------------------------------------------------
# Tune's records


def _open_tune_result(path: Path, trial: str | None = None):
    """The experiment's training trial as a ray.tune Result: its single one, or the one whose folder name
    starts with ``trial`` (``seed3_``: a trial of several seeds' training)."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    if not path.is_dir():
        raise ExperimentReadError(f"{path}: no such directory; pass <output_root>/<run.name>/train")
    try:
        analysis = ExperimentAnalysis(str(path))
    except ValueError as exc:  # Ray's message: no experiment_state-*.json found
        raise ExperimentReadError(f"{path}: not a Tune experiment ({exc})") from exc
    grid = ResultGrid(analysis)
    picked = [i for i in range(len(grid)) if trial is None or Path(grid[i].path).name.startswith(trial)]
    if len(picked) != 1:
        want = "exactly one trial (is this the sweep's folder?)" if trial is None else f"one trial {trial}*"
        raise ExperimentReadError(f"{path}: {len(picked)} of its {len(grid)} trials match; expected {want}")
    status = analysis.trials[picked[0]].status
    return grid[picked[0]], status


# ---------------------------------------------------------------------------
# Checkpoints


def verify_checkpoints(
    dirs: Iterable[Path], *, hashes: bool = True
) -> tuple[dict[Path, CheckpointInfo], dict[Path, str]]:
    """Verify every folder; return (complete ones, {path: why not}) and warn about each broken one."""
    good: dict[Path, CheckpointInfo] = {}
    bad: dict[Path, str] = {}
    for d in dirs:
        d = Path(d)
        try:
            good[d] = verify_checkpoint(d, hashes=hashes)
        except (CheckpointError, OSError, json.JSONDecodeError, KeyError) as exc:
            bad[d] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"checkpoint {d} is not usable and is left out of the analysis: {bad[d]}",
                IncompleteCheckpointWarning,
                stacklevel=2,
            )
    return good, bad


def _tune_checkpoint_epochs(result, epochs: pd.DataFrame) -> dict[str, int]:
    """Checkpoint folder name -> epoch, from Tune's record (used for folders whose meta.json is unreadable)."""
    out: dict[str, int] = {}
    if "checkpoint_dir_name" in epochs.columns:
        for name, epoch in zip(epochs["checkpoint_dir_name"], epochs["epoch"], strict=True):
            if isinstance(name, str):
                out[name] = int(epoch)
    for checkpoint, metrics in result.best_checkpoints or []:
        if "epoch" in metrics:
            out[Path(checkpoint.path).name] = int(metrics["epoch"])
    return out


def _records(
    trial_path: Path, tune_epochs: dict[str, int], tune_names: set[str], hashes: bool
) -> tuple[list[CheckpointRecord], dict[int, CheckpointInfo]]:
    dirs = sorted(set(trial_path.glob("checkpoint_*")) | {trial_path / n for n in tune_names})
    good, bad = verify_checkpoints(dirs, hashes=hashes)
    records: list[CheckpointRecord] = []
    by_epoch: dict[int, CheckpointInfo] = {}
    for d in dirs:
        recorded = d.name in tune_names
        if d in bad:
            records.append(CheckpointRecord(d, tune_epochs.get(d.name), False, bad[d], recorded))
            continue
        info = good[d]
        if info.epoch in by_epoch:
            # Two complete folders of one epoch: a resume re-trained it.  Tune numbers its folders in
            # writing order, so the later one belongs to the run whose history continued.
            older = by_epoch[info.epoch].path
            warnings.warn(
                f"epoch {info.epoch} has two complete checkpoints ({older.name}, {d.name}); using the later {d.name}",
                IncompleteCheckpointWarning,
                stacklevel=2,
            )
            records = [
                CheckpointRecord(
                    r.path, r.epoch, False, f"superseded by {d.name} (same epoch)", r.in_tune_record
                )
                if r.path == older
                else r
                for r in records
            ]
        by_epoch[info.epoch] = info
        records.append(CheckpointRecord(d, info.epoch, True, None, recorded))
    return records, by_epoch


# ---------------------------------------------------------------------------
# Tables from the checkpoints' metrics


def checkpoint_row(info: CheckpointInfo) -> dict:
    """The flat scalar keys of one checkpoint's metrics.json (the same keys Tune recorded), plus its path."""
    row = {
        k: v for k, v in info.metrics.items() if isinstance(v, int | float | str) and not isinstance(v, bool)
    }
    row["epoch"] = info.epoch
    row["path"] = str(info.path)
    return row


def module_rows(info: CheckpointInfo) -> list[dict]:
    """One row per module of one checkpoint: its real validation loss and metric (metrics.json "val")."""
    val = info.metrics.get("val")
    if not isinstance(val, dict) or "module_loss" not in val:
        raise CheckpointError(
            f"{info.path / 'metrics.json'}: no val.module_loss; not written by redheart_tune/tune/trainable.py"
        )
    tasks = info.meta.get("tasks", {})
    unit_of = {m: u.name for u in selection_units() for m in u.modules}
    rows = []
    for module, loss in val["module_loss"].items():
        task = MODULE_TASK[module]
        kind = tasks.get(task, {}).get("kind") if task else None
        rows.append(
            {
                "epoch": info.epoch,
                "module": module,
                "group": GROUP_OF[module],
                "unit": unit_of[module],
                "task": task,
                "val_loss": float(loss),
                "val_metric": val.get("module_metric", {}).get(module, float("nan")),
                "metric": None if kind is None else ("mae" if kind == "regression" else "accuracy"),
            }
        )
    return rows


def tables_from_checkpoints(infos: Iterable[CheckpointInfo]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(checkpoint table, module table) from verified checkpoints, sorted by epoch."""
    infos = sorted(infos, key=lambda i: i.epoch)
    wide = pd.DataFrame([checkpoint_row(i) for i in infos])
    long = pd.DataFrame([r for i in infos for r in module_rows(i)])
    if not wide.empty:
        wide = wide.sort_values("epoch").reset_index(drop=True)
    return wide, long


def load_training_run(
    experiment_dir: str | Path, *, hashes: bool = True, trial: str | None = None
) -> TrainingRun:
    """Read a training experiment; broken checkpoints are warned about, recorded, and left out.

    ``hashes=False`` skips the sha256 check (sizes are still checked) for a quick look at a big run;
    ``trial``: which trial of an experiment with several (``seed3_``), by the start of its folder name.
    """
    path = Path(experiment_dir).expanduser().resolve()
    result, status = _open_tune_result(path, trial)
    if result.metrics_dataframe is None or result.metrics_dataframe.empty:
        raise ExperimentReadError(
            f"{result.path}: Tune recorded no results for this trial (result.json / progress.csv empty or missing)"
        )
    if status != "TERMINATED":
        warnings.warn(
            f"{path}: the training trial's status is {status}; analysing the checkpoints written so far",
            stacklevel=2,
        )
    epochs = dedupe_epochs(result.metrics_dataframe)
    trial_path = Path(result.path)
    tune_names = {Path(c.path).name for c, _ in (result.best_checkpoints or [])}
    records, by_epoch = _records(trial_path, _tune_checkpoint_epochs(result, epochs), tune_names, hashes)
    wide, long = tables_from_checkpoints(by_epoch.values())
    config_file = path / CONFIG_FILE
    config = json.loads(config_file.read_text())["config"] if config_file.is_file() else None
    return TrainingRun(
        path=path,
        trial_path=trial_path,
        status=status,
        epochs=epochs,
        checkpoint_table=wide,
        modules=long,
        checkpoints=records,
        details={e: i.metrics for e, i in by_epoch.items()},
        meta={e: i.meta for e, i in by_epoch.items()},
        config=config,
    )
