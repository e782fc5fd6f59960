"""Where a run's outputs go: everything of run ``run.name`` lives under ``<run.output_root>/<run.name>/``.

    <output_root>/<name>/sweep/        Tune experiment of the LR sweep (+ redheart_config.json, split.json)
    <output_root>/<name>/lr_sweep/     per-trial JSON and CSV, best_lr.json, lr_sweep.png (+ .csv)
    <output_root>/<name>/train/        Tune experiment of the training run (+ redheart_config.json, split.json,
                                       session_info.json, session_info_final.json)
    <output_root>/<name>/analysis/     sweet spots, selection, results, figures
    <output_root>/<name>/final/        the crossover model
    <output_root>/<name>/seeds/        ``all --seeds N``: train/ (one Tune experiment, one trial per further seed),
                                       seed<k>/analysis/ and seed<k>/final/ for each of them

For a URI output root these are the paths of its local mirror (``tune.storage``).

Nothing of one run is read by another unless the user names it (``train --lr-from``).
"""

from __future__ import annotations

from pathlib import Path

from redheart_tune.config import Config, local_root

STAGES = ("sweep", "train")
"""The two Tune experiments of a run, each in ``<run dir>/<stage>``."""
CONFIG_FILE = "redheart_config.json"
"""The one stored config of an experiment (with its stage), compared on every reuse and resume."""
SPLIT_FILE = "split.json"
"""Every record id per split, recorded once per experiment."""
BEST_LR_FILE = "best_lr.json"


def run_dir(cfg: Config) -> Path:
    return local_root(cfg) / cfg.run.name


def experiment_dir(cfg: Config, stage: str) -> Path:
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}")
    return run_dir(cfg) / stage


def sweep_outputs_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "lr_sweep"


def best_lr_path(cfg: Config) -> Path:
    return sweep_outputs_dir(cfg) / BEST_LR_FILE


def analysis_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "analysis"


def final_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "final"


def seeds_dir(cfg: Config) -> Path:
    """The further seeds of ``all --seeds N``: one training experiment, and each seed's analysis."""
    return run_dir(cfg) / "seeds"


def seeds_experiment(cfg: Config) -> str:
    """Where the further seeds' training experiment lives, relative to the output root."""
    return f"{cfg.run.name}/seeds/train"
