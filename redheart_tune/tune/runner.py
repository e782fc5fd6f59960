"""The thin layer over Ray Tune both phases share: start or restore a Tuner, print progress, check the outcome.

Every experiment keeps one stored config (``tune.stored_config``).  Whether an experiment exists,
finished or not, comes from Ray's public API (``Tuner.can_restore``, ``ExperimentAnalysis``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from ray.tune import (
    CheckpointConfig,
    ExperimentAnalysis,
    FailureConfig,
    ResultGrid,
    RunConfig,
    SyncConfig,
    TuneConfig,
    Tuner,
    with_parameters,
    with_resources,
)
from ray.tune.experiment import Trial

from redheart_tune.config import Config, cache_dir
from redheart_tune.tune.callbacks import EpochPrinter, ResumeStatePruner
from redheart_tune.tune.recovery import ContinueTrial, ExperimentError, KeepTrialRecords, Recovery
from redheart_tune.tune.resources import cluster_address, trial_resources
from redheart_tune.tune.storage import storage
from redheart_tune.tune.trainable import TRIALS, run_trial
from redheart_tune.util.faults import FaultStop, out_of_space, space_line, take_fault

# Keep Tune's experiment-state snapshot fresh, so a killed driver resumes from its newest checkpoint.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
# Ray's own console output names a TensorBoard folder inside its temporary session directory;
# fit() prints the experiment's own folder instead, and EpochPrinter one line per epoch.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def trial_name(trial: Trial) -> str:
    """A trial's name and folder: its peak LR, readable (Tune's default rounds 1e-5 to 'lr=0.0000'),
    and its Tune id, unique for any search algorithm (optuna's 1.2e-4 and 1.4e-4 never collide); a trial
    of several seeds' training starts with its seed."""
    name = f"lr_{trial.config['lr']:.2e}_{trial.trial_id}"
    return f"seed{trial.config['seed']}_{name}" if "seed" in trial.config else name


def trainable_for(cfg: Config, stage: str, resume_from: Path | None = None):
    """The trial function with its config (and, on a cluster, its data) bound, and its resource request;
    ``resume_from``: the checkpoint a recovered trial continues from (``tune.recovery``).

    On a cluster (``resources.address``) the workers may not share the driver's filesystem, so the
    encoded data travels through Ray's object store, compacted to its own rows; on one machine the
    trials read the same encoding cache as the driver.
    """
    shipped = {}
    if cluster_address(cfg):
        from redheart_tune.data import prepare_data

        shipped["data"] = prepare_data(cfg.data, cache_dir(cfg), show_progress=False).compacted()
    if resume_from is not None:
        shipped["resume_from"] = str(resume_from)
    return with_resources(with_parameters(run_trial, cfg=cfg, trial=TRIALS[stage], **shipped), trial_resources(cfg))


# ---------------------------------------------------------------------------
# What is there: Ray's public API, never the snapshot's private layout


@dataclass(frozen=True)
class ExperimentStatus:
    """A Tune experiment on disk: each trial's status, and Ray's reader for the rest."""

    path: Path
    analysis: ExperimentAnalysis | None  # None: Tune wrote no snapshot yet (the driver died at start-up)
    problem: str | None = None  # Tune's snapshot is there but unreadable (torn): `resume` recovers it

    @property
    def trials(self) -> dict[str, str]:
        """Trial id -> Tune's status (PENDING, RUNNING, PAUSED, TERMINATED, ERROR)."""
        return {} if self.analysis is None else {t.trial_id: t.status for t in self.analysis.trials}

    @property
    def finished(self) -> bool:
        return bool(self.trials) and all(s == Trial.TERMINATED for s in self.trials.values())

    @property
    def results(self) -> ResultGrid | None:
        return None if self.analysis is None else ResultGrid(self.analysis)


def experiment_status(path: Path) -> ExperimentStatus | None:
    """None when ``path`` holds no Tune experiment (``Tuner.can_restore``), else its trials' state."""
    if not Tuner.can_restore(str(path)):
        return None
    try:
        analysis = ExperimentAnalysis(str(path))
    except json.JSONDecodeError as exc:  # torn by a full disk or a crash; tune.recovery continues it
        return ExperimentStatus(Path(path), None, f"Tune's experiment state is unreadable ({exc})")
    except ValueError:  # Ray's "No experiment snapshot file ... was found": nothing ran yet
        analysis = None
    return ExperimentStatus(Path(path), analysis)


def dedupe_epochs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per epoch, the last reported kept, sorted: a resumed trial reports the epochs after its
    checkpoint again, and the later report is the one the surviving weights belong to."""
    if "epoch" not in df.columns:
        raise ExperimentError(
            "the trial's results have no 'epoch' column; was it trained by redheart_tune/tune/trainable.py?"
        )
    return df.drop_duplicates(subset="epoch", keep="last").sort_values("epoch").reset_index(drop=True)


# ---------------------------------------------------------------------------
# Run


def fit(
    cfg: Config,
    stage: str,
    *,
    param_space: dict,
    tune_config: TuneConfig,
    epochs: int,
    resume: bool,
    experiment: str | None = None,
    recovery: Recovery | None = None,
):
    """Start a new experiment, or restore it when ``resume`` is set, or (``recovery``, when Tune's record
    of it is lost) start a fresh Tuner whose trial continues in its old folder from a checkpoint.

    ``experiment``: its place under the output root, ``<run.name>/<stage>`` unless given (the seeds'
    training is ``<run.name>/seeds/train``).  It lives in the run's storage (a local directory or a URI);
    a trial whose worker or node dies is restarted from its newest checkpoint up to
    ``resources.max_failures`` times.
    """
    experiment = experiment or f"{cfg.run.name}/{stage}"
    st = storage(cfg)
    path = st.local / experiment
    recovering = recovery is not None and recovery.problem is not None
    start = recovery.checkpoint.path if recovering and recovery.checkpoint else None
    trainable = trainable_for(cfg, stage, resume_from=start)
    shown = st.display(experiment) if st.remote else path
    print(f"[{stage}] Tune experiment {shown}  (TensorBoard: tensorboard --logdir {shown})", flush=True)
    # A local experiment is handed to Tune as a plain path, as Tune prefers; a remote one with its filesystem.
    fs = st.fs if st.remote else None
    if resume and not recovering:
        tuner = Tuner.restore(
            st.fs_path(experiment),
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=fs,
        )
        # The restored run keeps the RunConfig and TuneConfig it was started with: the callbacks, the trial names.
    else:
        callbacks = [FaultStop(), EpochPrinter(stage, epochs)]  # FaultStop first: before Tune's loggers
        if recovering:
            callbacks.append(KeepTrialRecords())
        if stage == "train" and cfg.train.keep_resume_state == "latest":
            callbacks.append(ResumeStatePruner(epochs))
        parent, name = experiment.rsplit("/", 1)
        run_config = RunConfig(
            name=name,
            storage_path=st.fs_path(parent),
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # all kept: the crossover needs every epoch
            failure_config=FailureConfig(max_failures=cfg.resources.max_failures),
            # A remote trial's own files (live_progress.json, per-step TensorBoard events) upload with its
            # reports, at most every sync_period (5 min): status and TensorBoard see them from the bucket.
            sync_config=SyncConfig(sync_artifacts=st.remote),
            callbacks=callbacks,
            verbose=0,
        )
        dirname = ContinueTrial(recovery.trial_dir.name, recovery.last_index) if recovering else trial_name
        named = dataclasses.replace(tune_config, trial_name_creator=trial_name, trial_dirname_creator=dirname)
        tuner = Tuner(trainable, param_space=param_space, tune_config=named, run_config=run_config)
    take_fault()  # none left from an earlier experiment in this process
    try:
        results = tuner.fit()
    except Exception as exc:  # a full disk: one line, no traceback, no retry (redheart_tune/util/faults.py)
        line = take_fault()
        if line is not None or out_of_space(exc) is not None:
            raise ExperimentError(_out_of_space_message(line, exc, path)) from None
        raise
    errors = [r for r in results if r.error is not None]
    if errors:
        lines = "; ".join(
            f"{r.path}: {type(r.error).__name__}: {str(r.error).splitlines()[-1] if str(r.error) else ''}"
            for r in errors
        )
        raise ExperimentError(
            f"{len(errors)} trial(s) of {path} failed ({lines}). "
            f"Fix the cause, then continue with: python run.py resume {path}"
        )
    return results


def _out_of_space_message(line: str | None, exc: BaseException, path: Path) -> str:
    """The one line a run stopped by a full disk (or quota, or read-only filesystem) ends with: a trial's
    ``line`` (path, free space, one checkpoint's size), or what the driver's own write met."""
    if line is None:  # the driver's own write (Tune's records) failed
        line = space_line(out_of_space(exc), path, None)
    return f"{line}. Not retried. Free space, then continue with: python run.py resume {path}"
