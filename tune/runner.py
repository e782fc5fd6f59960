"""The thin layer over Ray Tune both phases share: start or restore a Tuner, print progress, check the outcome."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ray.tune import Callback, CheckpointConfig, RunConfig, TuneConfig, Tuner, with_parameters, with_resources

from tune.checkpoints import write_json_atomic
from tune.config import Config, config_from_dict, config_to_dict, output_root
from tune.resources import trial_resources
from tune.trainable import run_trial

# Keep Tune's experiment-state snapshot fresh, so a killed driver resumes from its newest checkpoint.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")


class ExperimentError(RuntimeError):
    """An experiment is in a state the command cannot handle; the message says what to run instead."""


def experiment_dir(cfg: Config, stage: str) -> Path:
    return output_root(cfg) / f"{cfg.run.name}-{stage}"


class EpochPrinter(Callback):
    """One line per trial and epoch on the console, readable by a person."""

    def __init__(self, stage: str, epochs: int):
        self.stage, self.epochs = stage, epochs

    def on_trial_result(self, iteration, trials, trial, result, **info):
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


def trainable_for(cfg: Config, stage: str):
    return with_resources(with_parameters(run_trial, cfg=cfg, stage=stage), trial_resources(cfg))


def experiment_state(path: Path) -> dict[str, str] | None:
    """Trial id -> status from Tune's experiment snapshot, or None when no experiment is there."""
    snapshots = sorted(path.glob("experiment_state-*.json"))
    if not snapshots:
        return None
    # The snapshot is Tune's own file; reading statuses from it needs no Ray and no trainable.
    raw = json.loads(snapshots[-1].read_text())
    out = {}
    for trial_json, _runtime in raw.get("trial_data", []):
        t = json.loads(trial_json)
        out[t.get("trial_id", "?")] = t.get("status", "?")
    return out


CONFIG_FILE = "redheart_config.json"
SPLIT_FILE = "split.json"


def save_experiment_config(cfg: Config, path: Path, stage: str) -> None:
    """The config (for ``resume``) and the data split with every record id (recorded with the run)."""
    from tune.config import cache_dir
    from tune.data import prepare_data

    write_json_atomic(path / CONFIG_FILE, {"stage": stage, "config": config_to_dict(cfg)})
    split = prepare_data(cfg.data, cache_dir(cfg), show_progress=False).split_record()
    write_json_atomic(path / SPLIT_FILE, split)


def load_experiment_config(path: Path) -> tuple[Config, str]:
    """The config and stage an experiment was started with (for ``resume``)."""
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise ExperimentError(f"{f}: not found; {path} is not an experiment started by run.py")
    raw = json.loads(f.read_text())
    return config_from_dict(raw["config"], str(f)), raw["stage"]


def is_finished(path: Path) -> bool | None:
    """True when every trial finished, False when some did not, None when there is no experiment."""
    state = experiment_state(path)
    if state is None:
        return None
    return bool(state) and all(s == "TERMINATED" for s in state.values())


def fit(cfg: Config, stage: str, *, param_space: dict, tune_config: TuneConfig, epochs: int, resume: bool):
    """Start a new experiment, or restore ``<output_root>/<name>-<stage>`` when ``resume`` is set."""
    path = experiment_dir(cfg, stage)
    trainable = trainable_for(cfg, stage)
    if resume:
        if not Tuner.can_restore(str(path)):
            raise ExperimentError(f"{path}: no Tune experiment to resume there")
        tuner = Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
        # The restored run keeps its original RunConfig, the epoch printer included.
    else:
        run_config = RunConfig(
            name=path.name,
            storage_path=str(path.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # all kept: the crossover needs every epoch
            callbacks=[EpochPrinter(stage, epochs)],
            verbose=0,
        )
        tuner = Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    results = tuner.fit()
    errors = [r for r in results if r.error is not None]
    if errors:
        lines = "\n".join(
            f"  - {r.path}: {type(r.error).__name__}: {str(r.error).splitlines()[-1] if str(r.error) else ''}"
            for r in errors
        )
        raise ExperimentError(
            f"{len(errors)} trial(s) of {path} failed:\n{lines}\n"
            f"Fix the cause, then continue with: python run.py resume {path}"
        )
    return results
