"""Phase 2: the main training as one long Tune trial, a checkpoint every 2 epochs, all kept, resumable.

The peak LR comes from the command line (``optim.lr=``), from a sweep the user names
(``--lr-from``), or from this run's own sweep; ``with_lr`` puts it into the config,
so the experiment's stored config says which LR it really used.
"""

from __future__ import annotations

import json
import socket
from datetime import datetime, timezone
from pathlib import Path

import ray
import torch
from ray.tune import TuneConfig, grid_search

from redheart_tune.config import Config
from redheart_tune.layout import (
    BEST_LR_FILE,
    CONFIG_FILE,
    best_lr_path,
    experiment_dir,
    seeds_dir,
    seeds_experiment,
    sweep_outputs_dir,
)
from redheart_tune.tune.recovery import ExperimentError, Recovery, prepare_resume
from redheart_tune.tune.resources import start_ray
from redheart_tune.tune.runner import experiment_status, fit
from redheart_tune.tune.storage import pull, push, storage
from redheart_tune.tune.stored_config import (
    check_same_config,
    config_differences,
    load_experiment_config,
    save_experiment_config,
)
from redheart_tune.util.files import write_json_atomic

SWEEP_SETTINGS = ("sweep", "train", "optim.lr", "run.seed")
"""Fields a sweep's LR does not depend on: the sweep's own search, the training's length, the LR itself
and the seed.  Any other difference between a sweep and a training run makes its LR meaningless there."""


def with_lr(cfg: Config, lr: float) -> Config:
    """``cfg`` with ``optim.lr`` set to the peak LR the training really uses."""
    return cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": float(lr)})})


def read_best_lr(path: Path) -> tuple[float, dict]:
    """best_lr.json at ``path`` (a file, a run directory, or its lr_sweep folder): the LR and the whole record."""
    path = Path(path)
    for candidate in (path, path / BEST_LR_FILE, path / "lr_sweep" / BEST_LR_FILE):
        if candidate.is_file():
            record = json.loads(candidate.read_text())
            return float(record["best_lr"]), record
    raise ExperimentError(
        f"{path}: no {BEST_LR_FILE} there (pass the file, or the run directory holding lr_sweep/)"
    )


def _sweep_differences(cfg: Config, record: dict) -> list[tuple]:
    """Fields that differ between the sweep behind ``record`` and ``cfg``, when that sweep is still there."""
    sweep_dir = Path(record["experiment"])
    if not sweep_dir.is_dir():
        return []
    stored, _ = load_experiment_config(sweep_dir)
    return config_differences(stored, cfg, SWEEP_SETTINGS)


def choose_lr(cfg: Config, *, explicit_lr: bool, lr_from: Path | None = None) -> tuple[float, str]:
    """The peak LR and where it came from.

    explicit_lr: ``optim.lr=`` was given on the command line; lr_from: ``--lr-from PATH``.
    Without either, the LR is this run's own sweep result (``train.use_sweep_lr``),
    refused when that sweep ran a different model or data; else the config's optim.lr.
    """
    if explicit_lr and lr_from is not None:
        raise ExperimentError("give either optim.lr=... or --lr-from, not both")
    if explicit_lr:
        return cfg.optim.lr, "command line (optim.lr)"
    if lr_from is not None:
        lr, record = read_best_lr(lr_from)
        for key, theirs, ours in _sweep_differences(cfg, record):
            print(f"[train] note: the sweep in {lr_from} ran with {key}={theirs!r}; this run has {ours!r}")
        return lr, f"--lr-from {lr_from}"
    own = best_lr_path(cfg)
    if not (cfg.train.use_sweep_lr and own.is_file()):
        return cfg.optim.lr, f"config (optim.lr; no sweep result in {sweep_outputs_dir(cfg)})"
    lr, record = read_best_lr(own)
    diffs = _sweep_differences(cfg, record)
    if diffs:
        listed = "; ".join(f"{key}: {theirs!r} in the sweep, {ours!r} now" for key, theirs, ours in diffs)
        raise ExperimentError(
            f"this run's sweep ({record['experiment']}) was made with another configuration ({listed}); "
            f"its LR does not apply. Give optim.lr=..., or choose another run.name."
        )
    return lr, str(own)


def session_info(cfg: Config, lr_source: str) -> dict:
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"id": 0, "name": props.name, "memory_gb": round(props.total_memory / 2**30, 2)}
    return {
        "start_time": datetime.now(timezone.utc).isoformat(),
        "host": socket.gethostname(),
        "data_source": cfg.data.source,
        "data_path": cfg.data.path,
        "max_samples": cfg.data.max_samples,
        "gpu": gpu,
        "ray_resources": {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")},
        "lr": cfg.optim.lr,
        "lr_source": lr_source,
        "epochs": cfg.train.epochs,
    }


def _existing(path: Path, cfg: Config, *, resume_unfinished: bool, note: str, ignore: tuple[str, ...] = ()):
    """The training experiment at ``path`` (its records fetched from a remote root, not its weights), to
    reuse when finished or resume when not; None when there is none.  Only with the config it was
    started with; an unfinished one only when ``resume_unfinished`` (else the resume command is the error)."""
    status = experiment_status(pull(cfg, path, weights=False))
    if status is not None:
        check_same_config(path, cfg, "train", ignore)
        if not (status.finished or resume_unfinished):
            raise ExperimentError(
                f"{path} holds an unfinished training run. Continue it with: python run.py resume {path} "
                f"(or choose another run.name to start a new one)"
            )
        what = "finished; reusing it" if status.finished else "unfinished; resuming it"
        print(f"[train] {path}: {what} ({note})")
    return status


def _recovery(path: Path, cfg: Config) -> Recovery | None:
    """Before resuming the local training experiment at ``path`` (with the config it was started with):
    its broken checkpoints moved aside, and the plan when Tune's record of it cannot be used
    (``tune.recovery``); printed, one line each."""
    if storage(cfg).remote or not (path / CONFIG_FILE).is_file():
        return None
    check_same_config(path, cfg, "train")
    recovery = prepare_resume(path)
    for line in recovery.lines() if recovery else []:
        print(line, flush=True)
    return recovery


def run_train(cfg: Config, lr_source: str = "config (optim.lr)", *, resume_unfinished: bool = False):
    """Run the training experiment with peak LR ``cfg.optim.lr`` (see ``choose_lr`` and ``with_lr``).

    A finished experiment is reused and an unfinished one resumed when ``resume_unfinished``
    (else refused with the resume command), in both cases only with the config it was
    started with.  Returns Tune's ResultGrid.
    """
    path = experiment_dir(cfg, "train")
    recovery = _recovery(path, cfg) if resume_unfinished else None
    if recovery is not None and recovery.problem:  # Tune's record is lost: the checkpoints say where it was
        status = None
    else:
        status = _existing(path, cfg, resume_unfinished=resume_unfinished, note=f"peak LR {cfg.optim.lr:.2e}")
    start_ray(cfg)
    if status is None and recovery is None:
        print(f"[train] peak LR {cfg.optim.lr:.2e} from {lr_source}")
        save_experiment_config(cfg, path, "train")
        write_json_atomic(path / "session_info.json", session_info(cfg, lr_source))
        push(cfg, path / "session_info.json")
    results = fit(
        cfg,
        "train",
        param_space={"lr": cfg.optim.lr},
        tune_config=TuneConfig(num_samples=1, max_concurrent_trials=1),
        epochs=cfg.train.epochs,
        resume=status is not None,
        recovery=recovery,
    )
    result = results[0]
    checkpoints = sorted(Path(c.path).name for c, _ in result.best_checkpoints)
    if recovery is not None and recovery.problem:  # the fresh Tuner knows only the checkpoints it wrote
        checkpoints = sorted(d.name for d in Path(result.path).glob("checkpoint_*"))
    write_json_atomic(
        path / "session_info_final.json",
        {
            "end_time": datetime.now(timezone.utc).isoformat(),
            "trial_dir": result.path,
            "final_checkpoint": result.checkpoint.path if result.checkpoint else None,
            "checkpoints": checkpoints,
            "final_metrics": {k: v for k, v in result.metrics.items() if isinstance(v, int | float | str)},
        },
    )
    push(cfg, path / "session_info_final.json")
    return results


def run_train_seeds(cfg: Config, seeds: list[int], lr_source: str):
    """Train the run's model for each of ``seeds`` as the trials of one Tune experiment
    (``<run dir>/seeds/train``), in parallel as far as the resources allow; reused when finished,
    resumed when not, only with the config and seeds it was started with.  Returns Tune's ResultGrid."""
    path = seeds_dir(cfg) / "train"
    status = _existing(path, cfg, resume_unfinished=True, note=f"seeds {seeds}", ignore=("run.seed",))
    if status is not None:
        stored = json.loads((path / CONFIG_FILE).read_text()).get("seeds")
        if stored != seeds:
            raise ExperimentError(
                f"{path} trained seeds {stored}; {seeds} now. Choose another run.name for other seeds."
            )
    start_ray(cfg)
    if status is None:
        print(f"[train] seeds {seeds} at peak LR {cfg.optim.lr:.2e} from {lr_source}, as one Tune experiment")
        save_experiment_config(cfg, path, "train", seeds=seeds)
    return fit(
        cfg,
        "train",
        param_space={"lr": cfg.optim.lr, "seed": grid_search(seeds)},
        tune_config=TuneConfig(num_samples=1),  # as many at once as the resources allow
        epochs=cfg.train.epochs,
        resume=status is not None,
        experiment=seeds_experiment(cfg),
    )
