"""The thin layer over Ray Tune both phases share: start or restore a Tuner, print progress, check the outcome.

Every experiment keeps one stored config (``redheart_config.json``); reusing or
resuming it with a config that differs in a field that changes results is refused
(``check_same_config``).  Whether an experiment exists, finished or not, comes
from Ray's public API (``Tuner.can_restore``, ``ExperimentAnalysis``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import (
    Callback,
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

from redheart_tune.config import Config, cache_dir, config_from_dict, config_to_dict, is_uri, with_overrides
from redheart_tune.engine.checkpoints import MANIFEST, drop_resume_state
from redheart_tune.layout import CONFIG_FILE, SPLIT_FILE
from redheart_tune.tune.recovery import ContinueTrial, ExperimentError, KeepTrialRecords, Recovery
from redheart_tune.tune.resources import cluster_address, trial_resources
from redheart_tune.tune.storage import publish, storage
from redheart_tune.tune.trainable import TRIALS, run_trial
from redheart_tune.util.faults import FaultStop, out_of_space, space_line, take_fault
from redheart_tune.util.files import write_json_atomic

# Keep Tune's experiment-state snapshot fresh, so a killed driver resumes from its newest checkpoint.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
# Ray's own console output names a TensorBoard folder inside its temporary session directory;
# fit() prints the experiment's own folder instead, and EpochPrinter one line per epoch.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


class EpochPrinter(Callback):
    """One line per trial and epoch on the console, readable by a person."""

    def __init__(self, stage: str, epochs: int):
        self.stage, self.epochs = stage, epochs

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" not in result:  # a trial's fault report (tune.faults): FaultStop shows it
            return
        ckpt = "  [checkpoint]" if result.get("checkpoint_dir_name") else ""
        print(
            f"[{self.stage}] lr={result['lr_peak']:.1e}  epoch {result['epoch']:>3}/{self.epochs}"
            f"  train {result['train_loss']:.4f}  val {result['val_loss']:.4f}"
            f"  val acc {result['val_acc']:.3f}  grad {result['grad_norm']:.2f}"
            f"  lr {result['lr']:.2e}  {result['epoch_time_s']:.1f}s{ckpt}",
            flush=True,
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        print(
            f"[{self.stage}] trial {trial.trial_id} failed; see {trial.path}/error.txt",
            file=sys.stderr,
            flush=True,
        )


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


class ResumeStatePruner(Callback):
    """Keeps the resume state (optimizer, RNGs) in the newest checkpoints only, wherever they are stored.

    It runs in the driver after every persisted checkpoint, on the storage's own filesystem (a local
    directory or a bucket): while training the newest two keep it (a driver killed before its experiment
    snapshot names the newest checkpoint still finds one to resume from); after the last epoch only the
    newest.  ``train.keep_resume_state: all`` keeps it everywhere.
    """

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        last = (trial.last_result or {}).get("epoch") == self.epochs
        prune_resume_states(checkpoint.filesystem, checkpoint.path.rsplit("/", 1)[0], keep=1 if last else 2)


def prune_resume_states(fs, trial_dir: str, keep: int) -> None:
    """Drop the resume state of all but the ``keep`` newest complete checkpoints in ``trial_dir`` (on ``fs``)."""
    import pyarrow.fs as pafs

    found = []
    for info in fs.get_file_info(pafs.FileSelector(trial_dir)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        meta = f"{info.path}/meta.json"
        if fs.get_file_info([f"{info.path}/{MANIFEST}", meta])[0].type == pafs.FileType.File:
            with fs.open_input_stream(meta) as f:
                found.append((json.loads(f.readall())["epoch"], info.path))
    for _, directory in sorted(found, reverse=True)[keep:]:
        drop_resume_state(fs, directory)


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
# The stored config of an experiment


NO_RESULT_CHANGE = (
    "resources",
    "memory",
    "run.name",
    "run.output_root",
    "run.local_dir",
    "data.cache_dir",
    "train.progress_every_s",
    "data.holdout",
    "data.holdout_max_samples",
    "analysis",
)
"""Config fields that never change a run's results: where it runs and with what resources, how memory
is managed, where files go.  Every other field does, and a difference in it refuses a reuse or resume."""
NOT_READ_BY = {"sweep": ("train", "optim.lr"), "train": ("sweep", "train.use_sweep_lr")}
"""Fields an experiment does not read: the sweep takes its LRs from sweep.lrs; a training run's stored
optim.lr is the LR it really used, so where that came from (train.use_sweep_lr) does not matter."""


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(
    stored: Config, current: Config, ignore: tuple[str, ...] = (), *, every_field: bool = False
) -> list[tuple[str, Any, Any]]:
    """(key, stored value, current value) of every field that differs and changes results (with
    ``every_field``, of every field that differs)."""
    skip = ignore if every_field else (*NO_RESULT_CHANGE, *ignore)
    a, b = _flatten(config_to_dict(stored)), _flatten(config_to_dict(current))
    # A data file named relative to the working directory, then made absolute, is the same file.
    for flat in (a, b):
        if flat.get("data.path") and not is_uri(flat["data.path"]):
            flat["data.path"] = str(Path(flat["data.path"]).expanduser().resolve())
    return [
        (key, a.get(key, "<absent>"), b.get(key, "<absent>"))
        for key in sorted(a.keys() | b.keys())
        if not any(key == s or key.startswith(f"{s}.") for s in skip) and a.get(key) != b.get(key)
    ]


def save_experiment_config(cfg: Config, path: Path, stage: str, **extra: Any) -> None:
    """The experiment's one stored config (for reuse and ``resume``; ``extra`` fields beside it, such as the
    seeds of ``all --seeds N``) and the data split with every record id."""
    from redheart_tune.data import prepare_data

    write_json_atomic(path / CONFIG_FILE, {"stage": stage, "config": config_to_dict(cfg), **extra})
    split = prepare_data(cfg.data, cache_dir(cfg), show_progress=False).split_record()
    write_json_atomic(path / SPLIT_FILE, split)
    publish(cfg, path / CONFIG_FILE, path / SPLIT_FILE)


def load_experiment_config(path: Path) -> tuple[Config, str]:
    """The config and stage an experiment was started with."""
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise ExperimentError(f"{f}: not found; {path} is not an experiment started by run.py")
    raw = json.loads(f.read_text())
    return config_from_dict(raw["config"], str(f)), raw["stage"]


RESUME_MAY_CHANGE = ("optim.lr", "optim.grad_clip", "optim.eval_batch_size")
"""Besides NO_RESULT_CHANGE, what ``resume`` may change in a training run: they act from the resumed
epoch on and are recorded in the experiment's history (a lower LR or clipping after a NaN loss, a
smaller evaluation batch after running out of memory)."""


def resume_config(path: Path, overrides: list[str]) -> tuple[Config, str]:
    """The config to resume the experiment at ``path`` with: the stored one, plus ``overrides`` of the
    fields a resume may change; the change is stored, with the epoch it applies from, in the history."""
    stored, stage = load_experiment_config(path)
    if not overrides:
        return stored, stage
    cfg = with_overrides(stored, overrides, str(path / CONFIG_FILE))
    allowed = RESUME_MAY_CHANGE if stage == "train" else ()
    refused = config_differences(stored, cfg, allowed)
    if refused:
        listed = "; ".join(f"{key}: {old!r} stored, {new!r} asked" for key, old, new in refused)
        may = ", ".join([*NO_RESULT_CHANGE, *allowed])
        raise ExperimentError(
            f"{path}: a resume cannot change {listed}. It may change {may}; for anything else start a "
            "new run (another run.name)."
        )
    changed = {key: [old, new] for key, old, new in config_differences(stored, cfg, every_field=True)}
    record = json.loads((path / CONFIG_FILE).read_text())
    record["config"] = config_to_dict(cfg)
    record.setdefault("history", []).append(
        {
            "time": datetime.now(timezone.utc).isoformat(),
            "overrides": list(overrides),
            "changed": changed,
            "from_epoch": newest_checkpoint_epoch(path) + 1,
        }
    )
    write_json_atomic(path / CONFIG_FILE, record)
    publish(cfg, path / CONFIG_FILE)
    return cfg, stage


def newest_checkpoint_epoch(path: Path) -> int:
    """The epoch of the newest complete checkpoint under an experiment (0 when there is none)."""
    epochs = [
        json.loads((d / "meta.json").read_text())["epoch"]
        for d in Path(path).glob("*/checkpoint_*")
        if (d / "manifest.json").is_file() and (d / "meta.json").is_file()
    ]
    return max(epochs, default=0)


def check_same_config(path: Path, cfg: Config, stage: str, ignore: tuple[str, ...] = ()) -> None:
    """Refuse to reuse or resume the experiment at ``path`` with a config that would change its results."""
    stored, stored_stage = load_experiment_config(path)
    if stored_stage != stage:
        raise ExperimentError(f"{path} holds a {stored_stage} experiment, not a {stage} experiment")
    diffs = config_differences(stored, cfg, (*NOT_READ_BY[stage], *ignore))
    if diffs:
        listed = "; ".join(f"{key}: {old!r} stored, {new!r} now" for key, old, new in diffs)
        raise ExperimentError(
            f"{path} was run with another configuration ({listed}). Rerun with the stored values, "
            f"or choose another run.name for a new run."
        )


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
        # The restored run keeps its original RunConfig and TuneConfig: the callbacks, the trial names.
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
