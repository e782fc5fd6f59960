"""``resume`` of a training run that Tune's own files cannot derail.

Tune restores an experiment from its experiment state (``experiment_state-*.json``, with its searcher's
``basic-variant-state-*.json``).  A full disk or a crash can tear those files, or leave them naming a
checkpoint whose files are truncated; Tune then fails with a JSONDecodeError, or starts a new trial
without the run's config.  Every byte a resume needs is in the checkpoints themselves, so before a
training experiment is resumed ``prepare_resume``

- moves every checkpoint that does not verify (``verify_checkpoint``) aside, into ``<trial>/broken/``,
  never deleting it, and names it;
- when Tune's state is unreadable or names a checkpoint that did not verify, says so in one line and
  returns a ``Recovery``: the newest checkpoint that verifies and holds a resume state.  Tune's state
  files go to ``<experiment>/broken/``; a fresh Tuner (``tune.runner.fit``) starts the trial again in
  its own folder, restoring that checkpoint through the trial's own restore path
  (``tune.trainable.run_trial(resume_from=...)``), its checkpoint folders numbered on from the kept ones.

A run resumed this way ends bit-identical to an uninterrupted one (tests/test_faults.py).  Only a local
experiment of one trial is recovered this way; remote storage and the seeds' experiment keep Tune's path.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

from ray.tune import Callback

from redheart_tune.engine.checkpoints import (
    MANIFEST,
    META,
    CheckpointError,
    CheckpointInfo,
    verify_checkpoint,
)


class ExperimentError(RuntimeError):
    """An experiment is in a state the command cannot handle; the message says what to run instead."""


BROKEN = "broken"
"""Where what cannot be used is moved: ``<trial>/broken/`` for checkpoints, ``<experiment>/broken/`` for
Tune's state files."""
STATE_FILES = ("experiment_state-*.json", "basic-variant-state-*.json")
STATE_MOVED = "Tune's state, replaced by the fresh Tuner's"
CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)$")


@dataclass
class Recovery:
    """What ``prepare_resume`` did and found.  ``problem`` None: Tune's record is sound, Tune restores."""

    moved: list[tuple[Path, Path, str]] = field(default_factory=list)  # (from, to, why)
    problem: str | None = None  # why Tune's record is not used
    trial_dir: Path | None = None  # the trial's folder, continued by the fresh Tuner
    checkpoint: CheckpointInfo | None = None  # the checkpoint to continue from; None: from epoch 1
    last_index: int = -1  # the number of the newest kept checkpoint folder (Tune's next is one more)

    def lines(self) -> list[str]:
        out = [
            f"[resume] moved aside {src} -> {dst}: {why}"
            for src, dst, why in self.moved
            if why != STATE_MOVED
        ]
        if self.problem:
            start = (
                f"{self.checkpoint.path} (epoch {self.checkpoint.epoch})"
                if self.checkpoint
                else "epoch 1 (no checkpoint with a resume state verifies)"
            )
            out.append(
                f"[resume] {self.problem}; continuing the trial from {start} with a fresh Tuner "
                f"(Tune's old state files kept in {self.trial_dir.parent / BROKEN})"
            )
        return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _newest(path: Path, pattern: str) -> Path | None:
    found = sorted(path.glob(pattern))  # Tune's names end with a sortable timestamp
    return found[-1] if found else None


def read_tune_state(path: Path):
    """(Ray's ExperimentAnalysis of ``path``, None) or (None, the one line saying which file is unreadable)."""
    from ray.tune import ExperimentAnalysis

    state = _newest(path, STATE_FILES[0])
    try:
        analysis = ExperimentAnalysis(str(path))
    except Exception as exc:  # a torn JSON, an empty file, a trial Tune cannot rebuild
        return (
            None,
            f"Tune's experiment state {state.name if state else ''} is unreadable ({_first_line(exc)})",
        )
    searcher = _newest(path, STATE_FILES[1])
    if searcher is not None:
        try:  # Tune's searcher state: a pickle, read as Tune.restore would
            pickle.loads(searcher.read_bytes())
        except Exception as exc:
            return None, f"Tune's searcher state {searcher.name} is unreadable ({_first_line(exc)})"
    return analysis, None


def _index(d: Path) -> int:
    m = CHECKPOINT_NAME.match(d.name)
    return int(m.group(1)) if m else -1


def _move_aside(d: Path, why: str, moved: list) -> None:
    target = d.parent / BROKEN / d.name
    n = 1
    while target.exists():
        n += 1
        target = d.parent / BROKEN / f"{d.name}.{n}"
    target.parent.mkdir(exist_ok=True)
    d.rename(target)
    moved.append((d, target, why))


def _trial_dirs(path: Path) -> list[Path]:
    return sorted(
        d
        for d in path.iterdir()
        if d.is_dir() and d.name != BROKEN and ((d / "params.json").is_file() or any(d.glob("checkpoint_*")))
    )


def prepare_resume(path: Path) -> Recovery | None:
    """Before the training experiment at ``path`` is resumed: move its broken checkpoints aside and decide
    whether Tune's record can restore it (see the module docstring).  None: nothing to do here (no
    experiment, a finished one, or several trials)."""
    path = Path(path)
    if _newest(path, STATE_FILES[0]) is None:
        return None  # Tune never wrote a state: the experiment starts (or restarts) as new
    analysis, problem = read_tune_state(path)
    if analysis is not None and (
        len(analysis.trials) != 1 or all(t.status == "TERMINATED" for t in analysis.trials)
    ):
        return None
    trials = _trial_dirs(path)
    if len(trials) != 1:
        if problem is None:
            return None

        raise ExperimentError(
            f"{problem}, and {path} holds {len(trials)} trial folders, not one: it cannot be recovered "
            "from its checkpoints alone"
        )
    trial_dir = trials[0]
    named = None  # the checkpoint folder Tune would restore, by name (Tune may store another spelling)
    if analysis is not None and analysis.trials[0].checkpoint is not None:
        named = trial_dir / Path(analysis.trials[0].checkpoint.path).name

    rec = Recovery(trial_dir=trial_dir)
    good: dict[Path, CheckpointInfo] = {}
    for d in sorted(trial_dir.glob("checkpoint_*"), key=_index):
        try:  # sizes for every folder; sha256 too for the one Tune would restore
            good[d] = verify_checkpoint(d, hashes=d == named)
        except (CheckpointError, OSError, ValueError, KeyError) as exc:
            _move_aside(d, f"does not verify ({exc})", rec.moved)
            if d == named:
                problem = f"Tune's experiment state names {d}, which does not verify"
    if named is not None and problem is None and named not in good:
        problem = f"Tune's experiment state names {named}, which is not there"
    if problem is None:
        return rec  # Tune restores its own record; only the broken folders were moved aside

    rec.problem = problem
    for d in sorted(good, key=lambda d: (good[d].epoch, _index(d)), reverse=True):
        info = good[d]
        if info.has_resume_state:
            try:
                rec.checkpoint = verify_checkpoint(d, hashes=True)  # what the trial will load: every byte
                break
            except CheckpointError as exc:
                _move_aside(d, f"does not verify ({exc})", rec.moved)
                continue
        # Complete, but without a resume state: its epoch is trained again and written anew.
        _move_aside(d, f"epoch {info.epoch} keeps no resume state; a later one is trained again", rec.moved)
    rec.last_index = max((_index(d) for d in trial_dir.glob("checkpoint_*")), default=-1)
    for pattern in STATE_FILES:  # the fresh Tuner writes its own; Tune's old ones are kept, aside
        for f in sorted(path.glob(pattern)):
            _move_aside(f, STATE_MOVED, rec.moved)
    return rec


@dataclass(frozen=True)
class ContinueTrial:
    """The fresh Tuner's ``trial_dirname_creator`` in a recovery: the lost trial's own folder (its
    results, its checkpoints), the new checkpoint folders numbered on from the kept ones."""

    dirname: str
    last_index: int

    def __call__(self, trial) -> str:
        # Ray's StorageContext.current_checkpoint_index (a DeveloperAPI attribute) numbers the trial's
        # checkpoint folders; Tune sets it so when it restores a trial, and this trial has not started yet.
        trial.storage.current_checkpoint_index = self.last_index
        return self.dirname


class KeepTrialRecords(Callback):
    """The fresh Tuner's callback in a recovery: the trial's ``result.json`` and ``progress.csv`` go on
    from the lost trial's, so its history keeps the epochs before the checkpoint.

    Tune's loggers write into a driver-side copy of the trial folder (``trial.local_path``), filled from
    the experiment's storage only for a trial Tune restores itself; this fills it for the recovered one,
    before the loggers (which come after the run's own callbacks) open it; a torn last line is dropped."""

    def on_trial_start(self, iteration, trials, trial, **info):
        local = Path(trial.local_path)
        local.mkdir(parents=True, exist_ok=True)
        for name in ("result.json", "progress.csv"):
            src, dst = Path(trial.path) / name, local / name
            if dst.exists() or not src.is_file():
                continue
            data = src.read_bytes()
            dst.write_bytes(data[: data.rfind(b"\n") + 1])


def checkpoint_epochs(trial_dir: Path) -> list[int]:
    """Epochs of the complete checkpoints in a local trial folder (by their manifest and meta.json)."""
    return sorted(
        json.loads((d / META).read_text())["epoch"]
        for d in Path(trial_dir).glob("checkpoint_*")
        if (d / MANIFEST).is_file() and (d / META).is_file()
    )
