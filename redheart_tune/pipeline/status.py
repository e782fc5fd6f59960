"""``python run.py status``: where a run stands (sweep, training, analysis, the further seeds of
``all --seeds N``) and the command that comes next.

Everything is read through Ray's public API (``ExperimentAnalysis``, ``ResultGrid``)
and the files the stages write; nothing needs Ray to be running.  A running trial's
progress inside its epoch (step, samples/s, ETAs) comes from its ``live_progress.json``
(``tune.progress``), read by ``read_progress`` alone; ``--watch`` reprints it all.

A live run writes that file every few seconds while it trains.  When Tune's record
says trials are still running but no trial has written for longer than STALL_EPOCHS
epochs' time, the driver has died: the ``stalled`` warning names the resume command.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from ray.tune.experiment import Trial

from redheart_tune.config import Config
from redheart_tune.engine.progress import PROGRESS_FILE, WRITE_EVERY_S, format_seconds
from redheart_tune.layout import (
    CONFIG_FILE,
    analysis_dir,
    best_lr_path,
    experiment_dir,
    final_dir,
    run_dir,
    seeds_dir,
)
from redheart_tune.pipeline.analysis import (
    CROSSOVER_FILE,
    INTERVALS_SUMMARY_FILE,
    RESULTS_FILE,
    SWEET_SPOTS_FILE,
)
from redheart_tune.pipeline.runlock import lock_line
from redheart_tune.tune.recovery import BROKEN, ExperimentError
from redheart_tune.tune.runner import ExperimentStatus, dedupe_epochs, experiment_status
from redheart_tune.tune.storage import pull
from redheart_tune.tune.stored_config import (
    NOT_READ_BY,
    config_differences,
    load_experiment_config,
    newest_checkpoint_epoch,
)
from redheart_tune.tune.train import choose_lr, with_lr


def _differences(stored: Config, cfg: Config, stage: str) -> list[str]:
    diffs = config_differences(stored, cfg, NOT_READ_BY[stage])
    if not diffs:
        return []
    listed = "; ".join(f"{key}: {old!r} there, {new!r} given" for key, old, new in diffs)
    return [
        f"    differs from the given config ({listed}): reusing it with this config is refused; the next "
        "step below keeps the stored values (another run.name starts a new run)"
    ]


def stored_values(status: ExperimentStatus | None, cfg: Config, stage: str) -> dict[str, Any]:
    """The experiment's stored value of each field where ``cfg`` differs from it (and changes results)."""
    if status is None:
        return {}
    stored, _ = load_experiment_config(status.path)
    return {key: old for key, old, _ in config_differences(stored, cfg, NOT_READ_BY[stage])}


def override_text(value: Any) -> str:
    """``value`` as a ``key=value`` override writes it (YAML: a float keeps its dot, 1.0e-05)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        mantissa, e, exponent = repr(value).partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    if isinstance(value, str):
        return value if yaml.safe_load(value) == value else json.dumps(value)
    return str(value)


def with_stored_values(command: str, values: dict[str, Any]) -> str:
    """``command`` (config file and overrides) with ``values`` as overrides, in place of any it gave."""
    kept = [arg for arg in command.split() if arg.split("=", 1)[0] not in values]
    return " ".join([*kept, *(shlex.quote(f"{key}={override_text(v)}") for key, v in values.items())])


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


def training_config(cfg: Config, command: str) -> Config:
    """The config ``train`` and ``all`` would run with: the peak LR from the run's own sweep unless
    ``optim.lr=`` is in ``command``, so a stored training is compared with the LR it would really get,
    not the config file's optim.lr (which would call a run that ``all`` reuses "refused")."""
    explicit = any(arg.startswith("optim.lr=") for arg in command.split())
    try:
        lr, _ = choose_lr(cfg, explicit_lr=explicit)
    except ExperimentError:  # the sweep ran another configuration: the training's own line says what differs
        return cfg
    return with_lr(cfg, lr)


def _moved_aside(experiment: Path) -> list[str]:
    """What a resume moved aside (``tune.recovery``): checkpoints that did not verify, Tune's old state."""
    found = sorted([*experiment.glob(f"*/{BROKEN}/*"), *experiment.glob(f"{BROKEN}/*")])
    return [f"    moved aside (does not verify, or replaced): {p}" for p in found]


def _train_lines(status: ExperimentStatus, cfg: Config) -> list[str]:
    stored, _ = load_experiment_config(status.path)
    total = stored.train.epochs
    results = status.results
    if status.problem:
        on_disk = newest_checkpoint_epoch(status.path)
        return [
            f"  training  {status.path}: {status.problem}",
            f"    newest checkpoint folder with a manifest: epoch {on_disk}/{total}; resume verifies each and "
            "continues from the newest that verifies",
            *_moved_aside(status.path),
        ]
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
    return lines + _moved_aside(status.path) + _differences(stored, cfg, "train")


def _seeds_lines(status: ExperimentStatus, seeds: list[int], summary: Path) -> list[str]:
    """The further seeds of ``all --seeds N``: each seed's trial and epoch, and whether the summary over
    the seeds is written."""
    stored, _ = load_experiment_config(status.path)
    state = "finished" if status.finished else "unfinished"
    lines = [f"  seeds     {status.path}: {state}, seeds {seeds} (all --seeds {len(seeds) + 1})"]
    if status.analysis is not None:
        frames = status.analysis.trial_dataframes
        for trial in sorted(status.analysis.trials, key=lambda t: t.config.get("seed", 0)):
            df = frames.get(trial.trial_id)
            epoch = 0 if df is None or df.empty else int(dedupe_epochs(df)["epoch"].max())
            lines.append(
                f"    seed {trial.config.get('seed')}: epoch {epoch}/{stored.train.epochs}, {trial.status}"
            )
    lines.append(f"    summary over the seeds: {summary if summary.is_file() else 'not yet'}")
    return lines


STALL_EPOCHS = 3
"""``status`` warns that the driver has died once an experiment Tune records as running has written no
progress for this many epochs' time (an epoch's training and validation, as measured by the run)."""
STALL_MIN_S = 120.0
"""...and for at least this long: checkpoints, Tune's reports and a new trial's start make short pauses."""
STALL_START_S = 600.0
"""The allowance while the newest trial is starting (data, model, checkpoint restore) and has timed no
epoch yet."""
LIVE = (Trial.PENDING, Trial.RUNNING)


def read_progress(experiment: Path) -> dict[str, dict]:
    """Every trial's ``live_progress.json`` under ``experiment``, by trial folder: ``status``'s one reader
    of files the trials write (the place to point at remote storage)."""
    return {
        f.parent.name: json.loads(f.read_text()) for f in sorted(Path(experiment).glob(f"*/{PROGRESS_FILE}"))
    }


def allowed_silence_s(record: dict) -> float:
    """How long a live trial may go without writing progress: STALL_EPOCHS epochs, STALL_MIN_S at least;
    STALL_START_S while it starts and has timed nothing; plus, on remote storage, how late its files may
    be uploaded (Tune's sync period)."""
    own = max(STALL_EPOCHS * record["epoch_s"], STALL_MIN_S) if record.get("epoch_s") else STALL_START_S
    return own + record.get("upload_lag_s", 0.0)


def stalled(records: list[dict], now: float) -> tuple[float, float] | None:
    """(silence, allowed silence) when the newest of an experiment's progress records is older than its
    allowance, else None."""
    if not records:
        return None
    newest = max(records, key=lambda r: r["updated"])
    silence, allowed = now - newest["updated"], allowed_silence_s(newest)
    return (silence, allowed) if silence > allowed else None


def describe_progress(record: dict, now: float, *, live: bool = True) -> str:
    """One trial's place inside its epoch and what is left, counted from now (``live``; else only where
    it was when it last wrote)."""
    since = now - record["updated"]
    head = f"{record['trial']}: "
    if record["state"] == "starting":
        return f"{head}starting (for {format_seconds(now - record['started'])})"
    epoch, epochs = record["epoch"], record["epochs"]
    if record["state"] in ("finished", "diverged"):
        return f"{head}{record['state']} at epoch {epoch}/{epochs}"
    step, steps = record["step"], record["steps_per_epoch"]
    where = {
        "training": f"epoch {epoch}/{epochs}, step {step}/{steps} ({100 * step / steps:.0f} %)",
        "validating": f"epoch {epoch}/{epochs}, validating",
        "validated": f"epoch {epoch}/{epochs} done",
    }[record["state"]]
    if not live:
        return f"{head}{where}; written {format_seconds(since)} ago"
    run_eta = max(0.0, record["run_eta_s"] - since)
    finish = datetime.fromtimestamp(now + run_eta, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    eta = f"run ETA {format_seconds(run_eta)} (about {finish})"
    if not record["validation_measured"]:
        eta += " plus validation, not timed yet"
    if record["state"] == "training":
        eta = f"epoch ETA {format_seconds(max(0.0, record['epoch_eta_s'] - since))}, {eta}"
    return (
        f"{head}{where}, {record['samples_per_s']:.0f} samples/s, loss {record['loss']:.4f}; {eta}; "
        f"updated {format_seconds(since)} ago"
    )


def live_lines(status: ExperimentStatus, now: float, resume: str | None = None) -> list[str]:
    """Each running trial's progress, and the ``stalled`` warning when the experiment has gone silent
    (naming ``resume``, by default ``python run.py resume <experiment>``)."""
    live = {i for i, s in status.trials.items() if s in LIVE}  # Tune's ids; a trial's folder ends with its id
    if not live:
        return []
    records = read_progress(status.path)
    silent = stalled(list(records.values()), now)
    lines = [
        f"    {'last' if silent else 'now'} {describe_progress(r, now, live=not silent)}"
        for name, r in records.items()
        if any(name.endswith(i) for i in live)
    ]
    if silent:
        silence, allowed = silent
        lines.append(
            f"    WARNING stalled: no trial has written progress for {format_seconds(silence)}, longer than the "
            f"{format_seconds(allowed)} a live run may pause ({STALL_EPOCHS} epochs' time, "
            f"{format_seconds(STALL_MIN_S)} at least; a trial writes every {WRITE_EVERY_S:g} s while it trains). "
            "Its driver has probably died: if no python run.py process runs it any more, continue it with: "
            f"{resume or f'python run.py resume {status.path}'}"
        )
    return lines


def run_status(cfg: Config, command: str) -> list[str]:
    """Lines on run ``cfg.run.name``; ``command`` (the config file and overrides given) goes into the next step."""
    pull(cfg, run_dir(cfg), weights=False)  # a remote root: its records, never its weights
    sweep = experiment_status(experiment_dir(cfg, "sweep"))
    train = experiment_status(experiment_dir(cfg, "train"))
    now = time.time()
    lines = [f"[status] run {cfg.run.name!r} in {run_dir(cfg)}"]
    driver = lock_line(run_dir(cfg))  # a driver running it now, or the lock a killed one left
    lines += [driver] if driver else []
    lines += _sweep_lines(sweep, cfg) + live_lines(sweep, now) if sweep else ["  sweep     not started"]
    train_cfg = training_config(cfg, command)
    lines += _train_lines(train, train_cfg) + live_lines(train, now) if train else ["  training  not started"]
    # The next step names the stored values where the given config differs: with the given ones, the
    # command it names would be refused (status said "refused" and "next: analyze" in one breath).
    command = with_stored_values(
        command, {**stored_values(sweep, cfg, "sweep"), **stored_values(train, train_cfg, "train")}
    )
    steps = [
        ("analyze", analysis_dir(cfg) / SWEET_SPOTS_FILE),
        ("crossover", final_dir(cfg) / CROSSOVER_FILE),
        ("report", analysis_dir(cfg) / RESULTS_FILE),
    ]
    done = [name for name, f in steps if f.is_file()]
    if train is not None:
        lines.append(f"  analysis  done: {', '.join(done) or 'none'}")
    seeds = experiment_status(seeds_dir(cfg) / "train")
    summary = analysis_dir(cfg) / "seeds" / INTERVALS_SUMMARY_FILE
    further = None
    if seeds is not None:
        seed_list = json.loads((seeds.path / CONFIG_FILE).read_text()).get("seeds", [])
        further = f"python run.py all --seeds {len(seed_list) + 1}{f' {command}' if command else ''}"
        lines += _seeds_lines(seeds, seed_list, summary) + live_lines(seeds, now, resume=further)
    step = next_step(cfg, sweep, train, steps, command)
    if step.startswith("nothing") and seeds is not None and not (seeds.finished and summary.is_file()):
        step = f"{further}  (continues the seeds; once no driver runs it any more)"
    return [*lines, f"[status] next: {step}"]


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


def print_status(cfg: Config, command: str, watch_s: float | None = None) -> None:
    """``run.py status``: the lines once, or with ``watch_s`` every ``watch_s`` seconds until Ctrl-C (the
    sweep's trials and the training alike)."""
    if watch_s is None:
        print("\n".join(run_status(cfg, command)))
        return
    try:
        while True:
            lines = run_status(cfg, command)
            if sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")  # a fresh screen each time
            stamp = datetime.now().strftime("%H:%M:%S")
            print(f"[status] {stamp}, every {watch_s:g} s until Ctrl-C", *lines, sep="\n", flush=True)
            time.sleep(watch_s)
    except KeyboardInterrupt:
        print()
