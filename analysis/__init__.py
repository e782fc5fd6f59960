"""Phases 3 and 4 and the paper's outputs: read a training run, find sweet spots, cross over, evaluate.

    from analysis import analyze, crossover, evaluate_all
    report = analyze("runs/redheart/train", "runs/redheart/analysis")
    summary = crossover("runs/redheart/train", "runs/redheart/final")
    results = evaluate_all("runs/redheart/train", "runs/redheart/analysis")   # test split and held-out set

Note: ``analysis.crossover`` the *attribute* is the stage function above; the
module of the same name is imported as ``from analysis.crossover import ...``.
"""

from analysis.crossover import (
    DEFAULT_DELTAS,
    CrossoverError,
    assemble_soup_state,
    assemble_state,
    build_crossover,
    build_group_soup,
    check_compatible,
    model_from_meta,
    shift_spot,
    variant_spots,
    window_members,
)
from analysis.evaluate import (
    METHODS,
    aggregate_seeds,
    paired_differences,
    read_results,
    select_methods,
    val_only,
)
from analysis.experiment import (
    CheckpointRecord,
    ExperimentReadError,
    IncompleteCheckpointWarning,
    TrainingRun,
    dedupe_epochs,
    load_training_run,
)
from analysis.figures import (
    learning_curves_figure,
    lr_sweep_figure,
    memory_figure,
    methods_figure,
    sweet_spot_heatmap,
)
from analysis.pipeline import analyze, crossover, evaluate_all, summarize_seeds
from analysis.sweet_spots import RULES, SweetSpotError, select_sweet_spots, sweet_spot_report
from analysis.uncertainty import interval_table, mcnemar_exact

__all__ = [
    "DEFAULT_DELTAS",
    "METHODS",
    "RULES",
    "CheckpointRecord",
    "CrossoverError",
    "ExperimentReadError",
    "IncompleteCheckpointWarning",
    "SweetSpotError",
    "TrainingRun",
    "aggregate_seeds",
    "analyze",
    "assemble_soup_state",
    "assemble_state",
    "build_crossover",
    "build_group_soup",
    "check_compatible",
    "crossover",
    "dedupe_epochs",
    "evaluate_all",
    "interval_table",
    "learning_curves_figure",
    "load_training_run",
    "lr_sweep_figure",
    "mcnemar_exact",
    "memory_figure",
    "methods_figure",
    "model_from_meta",
    "paired_differences",
    "read_results",
    "select_methods",
    "select_sweet_spots",
    "shift_spot",
    "summarize_seeds",
    "sweet_spot_heatmap",
    "sweet_spot_report",
    "val_only",
    "variant_spots",
    "window_members",
]
