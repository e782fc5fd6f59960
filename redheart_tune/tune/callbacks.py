"""The driver's Tune callbacks: a console line per trial and epoch, and the pruning of older checkpoints'
resume state."""

from __future__ import annotations

import json
import sys

from ray.tune import Callback

from redheart_tune.engine.checkpoints import MANIFEST, META, drop_resume_state
from redheart_tune.util.faults import RESUME_STATES_KEPT


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


class ResumeStatePruner(Callback):
    """Keeps the resume state (optimizer, RNGs) in the newest checkpoints only, wherever they are stored.

    It runs in the driver after every persisted checkpoint, on the storage's own filesystem (a local
    directory or a bucket): while training the newest ``RESUME_STATES_KEPT`` (two) keep it (a driver killed before its experiment
    snapshot names the newest checkpoint still finds one to resume from); after the last epoch only the
    newest.  ``train.keep_resume_state: all`` keeps it everywhere.
    """

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        last = (trial.last_result or {}).get("epoch") == self.epochs
        keep = 1 if last else RESUME_STATES_KEPT
        prune_resume_states(checkpoint.filesystem, checkpoint.path.rsplit("/", 1)[0], keep=keep)


def prune_resume_states(fs, trial_dir: str, keep: int) -> None:
    """Drop the resume state of all but the ``keep`` newest complete checkpoints in ``trial_dir`` (on ``fs``)."""
    import pyarrow.fs as pafs

    found = []
    for info in fs.get_file_info(pafs.FileSelector(trial_dir)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        meta = f"{info.path}/{META}"
        if fs.get_file_info([f"{info.path}/{MANIFEST}", meta])[0].type == pafs.FileType.File:
            with fs.open_input_stream(meta) as f:
                found.append((json.loads(f.readall())["epoch"], info.path))
    for _, directory in sorted(found, reverse=True)[keep:]:
        drop_resume_state(fs, directory)
