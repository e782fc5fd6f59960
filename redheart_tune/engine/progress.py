"""Progress inside an epoch, measured in one place: the console line, ``run.py status`` and TensorBoard's
per-step scalars all show what ``Progress`` measured.

    directory, lag = trial_files()
    progress = Progress(directory, stage="train", lr_peak=lr, epochs=60, print_every_s=60, upload_lag_s=lag)
    for epoch in range(start, epochs + 1):
        tr = train_epoch(state, data, epoch, on_step=progress.hook(state.placement))
        val = validate_state(state, data)
        progress.end_epoch(epoch)               # the time since the last step was validation
                                                # after the last one: finished
In the trial's directory, beside Tune's result.json and per-epoch TensorBoard events:

    live_progress.json   where the trial stands (epoch, step, samples/s, loss, the ETAs, when it was
                         written): atomically, at the trial's start, at most every WRITE_EVERY_S seconds
                         while it trains, before and after each validation, and at its end
    steps/events.*       TensorBoard, one point per optimizer step (x = steps since the run's start):
                         step/loss, step/lr, step/grad_norm, step/samples_per_s, step/memory_peak_mb
                         (the step's peak over its unit turns, where memory is budgeted) and step/moved_mb
                         (bytes moved between CPU and GPU in the step)

The per-step events go to a subfolder so that TensorBoard reads them as their own run: two event files
written at once in one folder are read one after the other, and a live view would stop updating the
first.  Only ``trial_files`` asks Ray anything.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from redheart_tune.util.files import write_json_atomic

if TYPE_CHECKING:
    from redheart_tune.engine.loop import StepInfo

PROGRESS_FILE = "live_progress.json"
STEPS_DIR = "steps"
WRITE_EVERY_S = 5.0
"""The progress file and the step events reach the disk at most this often while a trial trains (a
730M step takes seconds, a tiny one milliseconds: the throttle is by time, not by steps)."""
MiB = 2**20


@dataclass(frozen=True)
class Estimate:
    """What the measured times say about the rest of a trial."""

    samples_per_s: float  # this epoch so far
    epoch_eta_s: float  # the rest of this epoch's training
    run_eta_s: float  # the rest of this epoch, its validation, and every later epoch with theirs
    epoch_s: float  # one whole epoch, training and validation
    validation_measured: bool  # False: no validation timed yet, so the run's ETA leaves it out


def estimate(
    *,
    step: int,
    steps_per_epoch: int,
    elapsed_s: float,
    rows: int,
    epochs_after: int,
    train_epoch_s: float | None = None,
    validation_s: float | None = None,
) -> Estimate:
    """The ETAs after ``step`` of ``steps_per_epoch`` optimizer steps, ``elapsed_s`` seconds and ``rows``
    samples into an epoch that has ``epochs_after`` epochs after it.

    The rest of this epoch runs at this epoch's pace so far.  A later epoch takes ``train_epoch_s`` (the
    mean training time of the epochs this trial finished; None: this epoch's pace stands in) plus
    ``validation_s`` (the mean validation time measured so far; None: not measured yet, counted as 0).
    """
    per_step = elapsed_s / max(step, 1)
    epoch_eta = (steps_per_epoch - step) * per_step
    train_s = train_epoch_s if train_epoch_s is not None else per_step * steps_per_epoch
    val_s = validation_s or 0.0
    return Estimate(
        samples_per_s=rows / elapsed_s if elapsed_s > 0 else 0.0,
        epoch_eta_s=epoch_eta,
        run_eta_s=epoch_eta + val_s + epochs_after * (train_s + val_s),
        epoch_s=train_s + val_s,
        validation_measured=validation_s is not None,
    )


def format_seconds(seconds: float) -> str:
    """A duration as a person reads it: '0.4 s', '45 s', '2 min', '12 min 5 s', '3 h 20 min', '2 d 4 h'."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 10:
        return f"{max(0.0, seconds):.1f} s"
    s = round(seconds)
    for big, unit, small, small_unit in (
        (86400, "d", 3600, "h"),
        (3600, "h", 60, "min"),
        (60, "min", 1, "s"),
    ):
        if s >= big:
            rest = s % big // small
            return f"{s // big} {unit}" + (f" {rest} {small_unit}" if rest else "")
    return f"{s} s"


def step_memory(placement, epoch: int, step: int) -> tuple[int | None, int]:
    """(peak bytes over the step's unit turns, or None where memory is not budgeted; bytes moved between
    CPU and GPU) of optimizer step ``step`` of ``epoch``, read from the placement's records without
    draining them: its newest entries are this step's (each entry carries its epoch and step)."""
    peaks = []
    for turn in reversed(placement.trace):
        if (turn["epoch"], turn["step"]) != (epoch, step):
            break
        peaks.append(turn["peak_bytes"])
    moved = 0
    for move in reversed(placement.moves):
        if (move.epoch, move.step) != (epoch, step):
            break
        moved += move.bytes
    return (max(peaks) if peaks else None), moved


class Progress:
    """One trial's progress: fed after every optimizer step (``hook``) and after each validation
    (``end_epoch``); prints, writes ``live_progress.json`` and the per-step TensorBoard scalars."""

    def __init__(
        self,
        directory: Path,
        *,
        stage: str,
        lr_peak: float,
        epochs: int,
        print_every_s: float,
        upload_lag_s: float = 0.0,
        clock=time.monotonic,
        now=time.time,
    ):
        self.directory = Path(directory)
        self.stage, self.lr_peak, self.epochs = stage, lr_peak, epochs
        self.trial = self.directory.name  # the trial's folder is named after it
        self.print_every_s = print_every_s
        self.upload_lag_s = upload_lag_s  # remote storage: how late the files may reach it (status allows it)
        self.clock, self.now = clock, now
        self.train_s: list[float] = []  # training time of each epoch finished in this trial
        self.validation_s: list[float] = []
        self.started = now()
        self.last_print = self.last_write = clock()
        self.last_step_at: float | None = None  # clock() at the newest step
        self.last_step_s = 0.0  # its StepInfo.seconds
        self.record: dict = {"state": "starting", "epoch": None, "step": 0}
        self.writer = None  # TensorBoard's, opened at the first step (it needs the global step)
        self.setup_s: dict[str, float] = {}  # the trial's set-up phases before its first step (``started``)
        self.first_epoch: int | None = None  # the first epoch this trial ran, and its step times
        self.first_steps: list[float] = []
        self.placement = None  # the hooked training state's, for its home buffers' bytes and seconds
        self.startup: dict | None = None  # set at the end of the first epoch (``startup_line``)
        self._write()

    # -- the three consumers ------------------------------------------------

    def hook(self, placement):
        """``train_epoch``'s ``on_step`` for a training state whose memory records are ``placement``'s."""

        self.placement = placement

        def on_step(info: StepInfo) -> None:
            self.step(info, step_memory(placement, info.epoch, info.step))

        return on_step

    def started_after(self, phases: dict[str, float]) -> None:
        """The set-up the trial did before its first step: phase -> seconds (data, model, plan, placement,
        restore).  The first epoch's end reports it with the first step's excess (``startup_line``)."""
        self.setup_s = dict(phases)

    def step(self, info: StepInfo, memory: tuple[int | None, int] = (None, 0)) -> None:
        """After an optimizer step: the scalars every step, the file and the console line by the clock."""
        t = self.clock()
        global_step = (info.epoch - 1) * info.steps_per_epoch + info.step
        if self.writer is None:
            self.writer = self._open_writer(global_step)
        step_s = info.seconds - (self.last_step_s if info.step > 1 else 0.0)
        self.last_step_at, self.last_step_s = t, info.seconds
        if self.first_epoch is None:
            self.first_epoch = info.epoch
        if info.epoch == self.first_epoch:
            self.first_steps.append(step_s)
        rows = self.record.get("rows", 0) + info.rows if info.step > 1 else info.rows
        est = estimate(
            step=info.step,
            steps_per_epoch=info.steps_per_epoch,
            elapsed_s=info.seconds,
            rows=rows,
            epochs_after=self.epochs - info.epoch,
            train_epoch_s=_mean(self.train_s),
            validation_s=_mean(self.validation_s),
        )
        last = info.step == info.steps_per_epoch
        self.record = {
            "state": "validating" if last else "training",
            "epoch": info.epoch,
            "step": info.step,
            "steps_per_epoch": info.steps_per_epoch,
            "global_step": global_step,
            "rows": rows,
            "loss": info.loss,
            "lr": info.lr,
            "grad_norm": info.grad_norm,
            **asdict(est),
        }
        peak, moved = memory
        scalars = {
            "loss": info.loss,
            "lr": info.lr,
            "grad_norm": info.grad_norm,
            "samples_per_s": info.rows / step_s if step_s > 0 else 0.0,
            "moved_mb": moved / MiB,
        }
        if peak is not None:
            scalars["memory_peak_mb"] = peak / MiB
        for name, value in scalars.items():
            self.writer.add_scalar(f"step/{name}", value, global_step)
        if last or info.step == 1 or t - self.last_write >= WRITE_EVERY_S:
            self._write()
        if self.print_every_s > 0 and t - self.last_print >= self.print_every_s:
            self.last_print = t
            print(self.line(), flush=True)

    def end_epoch(self, epoch: int) -> None:
        """After the epoch's validation: the time since its last step was validation.  After the last
        epoch the trial is finished."""
        if self.last_step_at is None or self.record.get("epoch") != epoch:
            return
        validation_s = self.clock() - self.last_step_at
        if epoch == self.first_epoch and self.startup is None and self.setup_s:
            self.startup = self._startup()
            print(startup_line(self.stage, self.startup), flush=True)
        self.train_s.append(self.last_step_s)
        self.validation_s.append(validation_s)
        val_mean = _mean(self.validation_s)
        epoch_s = _mean(self.train_s) + val_mean
        self.record.update(
            state="validated",
            epoch_eta_s=0.0,
            run_eta_s=(self.epochs - epoch) * epoch_s,
            epoch_s=epoch_s,
            validation_s=validation_s,
            validation_measured=True,
        )
        if epoch == self.epochs:
            self.close("finished")
        else:
            self._write()

    def _startup(self) -> dict:
        """What the trial's start cost beyond its steps' pace: the set-up phases, and the first step's
        time over the median of the first epoch's later ones (CUDA's and cuDNN's initialisation, the
        streamed units' moments allocated and page-locked, the allocator's first growth)."""
        steps = self.first_steps
        typical = statistics.median_high(steps[1:]) if steps[1:] else None
        extra = max(0.0, steps[0] - typical) if steps and typical is not None else 0.0
        home_bytes = getattr(self.placement, "home_bytes", 0)
        return {
            "setup_s": self.setup_s,
            "first_step_s": steps[0] if steps else None,
            "typical_step_s": typical,
            "first_step_extra_s": extra,
            "home_gib": home_bytes / 2**30,
            "home_s": getattr(self.placement, "home_s", 0.0),
            "total_s": sum(self.setup_s.values()) + extra,
        }

    def close(self, state: str = "finished") -> None:
        """The trial's end (``state``: finished, diverged): the last record, every event on disk."""
        self.record.update(state=state, epoch_eta_s=0.0, run_eta_s=0.0)
        self._write()
        if self.writer is not None:
            self.writer.close()

    def line(self) -> str:
        """The console line: where the trial is inside its epoch and how long the rest takes."""
        r = self.record
        return (
            f"[{self.stage}] lr={self.lr_peak:.1e}  epoch {r['epoch']}/{self.epochs}"
            f"  step {r['step']}/{r['steps_per_epoch']} ({100 * r['step'] / r['steps_per_epoch']:.0f} %)"
            f"  loss {r['loss']:.4f}  {r['samples_per_s']:.0f} samples/s"
            f"  epoch ETA {format_seconds(r['epoch_eta_s'])}  run ETA {format_seconds(r['run_eta_s'])}"
            f"{'' if r['validation_measured'] else ' + validation'}"
        )

    # -- files ----------------------------------------------------------------

    def _open_writer(self, global_step: int):
        from tensorboardX import SummaryWriter

        # A resumed trial repeats the steps after its checkpoint: purge_step hides the old run's copies.
        return SummaryWriter(
            str(self.directory / STEPS_DIR), purge_step=global_step, flush_secs=int(WRITE_EVERY_S)
        )

    def _write(self) -> None:
        self.last_write = self.clock()
        updated = self.now()
        write_json_atomic(
            self.directory / PROGRESS_FILE,
            {
                "stage": self.stage,
                "trial": self.trial,
                "lr_peak": self.lr_peak,
                "epochs": self.epochs,
                "started": self.started,
                "upload_lag_s": self.upload_lag_s,
                **self.record,
                "updated": updated,
                "updated_utc": datetime.fromtimestamp(updated, timezone.utc).isoformat(timespec="seconds"),
            },
        )
        if self.writer is not None:
            self.writer.flush()


def startup_line(stage: str, startup: dict) -> str:
    """One line on what a trial's start cost: its set-up phases, the first step's excess over the later
    steps, and the CPU home buffers it page-locked (in the set-up and in the first step)."""
    phases = ", ".join(f"{name} {format_seconds(s)}" for name, s in startup["setup_s"].items())
    line = f"[{stage}] start-up cost {format_seconds(startup['total_s'])}: set-up ({phases})"
    if startup["typical_step_s"] is not None:
        line += (
            f"; first step {format_seconds(startup['first_step_s'])} against"
            f" {format_seconds(startup['typical_step_s'])} for the later ones"
        )
    if startup["home_gib"] > 0:
        line += f"; home buffers {startup['home_gib']:.2f} GiB allocated in {format_seconds(startup['home_s'])}"
    return line


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def trial_files() -> tuple[Path, float]:
    """Inside a Tune trial: where its own files go, and how late they may reach the experiment's storage.

    On a local or shared filesystem: its folder in the experiment, beside Tune's result.json, at once.  On
    remote storage: its working directory on its node, which Tune uploads with the trial's reports
    (``SyncConfig(sync_artifacts=True)``, redheart_tune/tune/runner.py) at most every ``sync_period`` seconds.
    """
    import pyarrow.fs
    from ray.tune import get_context

    storage = get_context().get_storage()
    if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return Path(storage.trial_fs_path), 0.0
    return Path(get_context().get_trial_dir()), float(storage.sync_config.sync_period)
