"""Phase 2: the main training as one long Tune trial, a checkpoint every 2 epochs, all kept, resumable."""

from __future__ import annotations

import json
import socket
from datetime import datetime, timezone
from pathlib import Path

import ray
import torch
from ray.tune import TuneConfig

from tune.checkpoints import write_json_atomic
from tune.config import Config, config_to_dict
from tune.runner import ExperimentError, experiment_dir, fit, is_finished, save_experiment_config
from tune.sweep import best_lr_path


def choose_lr(cfg: Config, *, lr_from_command_line: bool) -> tuple[float, str]:
    """The LR and where it came from: the command line, else the sweep's best_lr.json, else the config."""
    if lr_from_command_line:
        return cfg.optim.lr, "command line (optim.lr)"
    path = best_lr_path(cfg)
    if cfg.train.use_sweep_lr and path.is_file():
        return float(json.loads(path.read_text())["best_lr"]), str(path)
    return cfg.optim.lr, "config (optim.lr; no sweep result found)"


def session_info(cfg: Config, lr: float, lr_source: str) -> dict:
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
        "lr": lr,
        "lr_source": lr_source,
        "epochs": cfg.train.epochs,
        "config": config_to_dict(cfg),
    }


def run_train(cfg: Config, *, lr_from_command_line: bool = False, resume: bool = False):
    """Run the training experiment (or resume it); returns Tune's ResultGrid."""
    path = experiment_dir(cfg, "train")
    finished = is_finished(path)
    if not resume and finished is False:
        raise ExperimentError(
            f"{path} holds an unfinished training run. Continue it with:\n    python run.py resume {path}\n"
            f"or choose another run.name / run.output_root to start a new one."
        )
    if finished and not resume:
        print(f"[train] {path} already finished; reusing it (choose another run.name to train again)")
        resume = True  # restoring a finished experiment returns its results without training
    path.mkdir(parents=True, exist_ok=True)
    if not resume:
        lr, source = choose_lr(cfg, lr_from_command_line=lr_from_command_line)
        print(f"[train] peak LR {lr:.2e} from {source}")
        save_experiment_config(cfg, path, "train")
        write_json_atomic(path / "session_info.json", session_info(cfg, lr, source))
    else:
        lr = float(json.loads((path / "session_info.json").read_text())["lr"])
    results = fit(
        cfg,
        "train",
        param_space={"lr": lr},
        tune_config=TuneConfig(num_samples=1, max_concurrent_trials=1),
        epochs=cfg.train.epochs,
        resume=resume,
    )
    result = results[0]
    checkpoints = sorted(Path(c.path).name for c, _ in result.best_checkpoints)
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
    return results
