"""Phases 3 and 4 and the paper's outputs, as pure analysis of a finished run: read it, find sweet spots,
assemble crossovers and soups, evaluate, draw figures.  The stages that run them are in
``redheart_tune.pipeline`` (``analyze``, ``crossover``, ``evaluate_all``).
"""

from redheart_tune.analysis.crossover import (
    DEFAULT_DELTAS,
    assemble_state,
    build_crossover,
    shift_spot,
    variant_spots,
)
from redheart_tune.analysis.evaluate import METHODS, val_only
from redheart_tune.analysis.experiment import (
    CheckpointRecord,
    ExperimentReadError,
    IncompleteCheckpointWarning,
    TrainingRun,
    dedupe_epochs,
    load_training_run,
)
from redheart_tune.analysis.figures import (
    learning_curves_figure,
    lr_sweep_figure,
    memory_figure,
    methods_figure,
    sweet_spot_heatmap,
)
from redheart_tune.analysis.seeds import aggregate_seeds, paired_differences, read_results
from redheart_tune.analysis.selection import select_methods
from redheart_tune.analysis.soups import assemble_soup_state, build_group_soup, window_members
from redheart_tune.analysis.sweet_spots import RULES, SweetSpotError, select_sweet_spots, sweet_spot_report
from redheart_tune.analysis.uncertainty import interval_table, mcnemar_exact
from redheart_tune.analysis.weights import CrossoverError, check_compatible, model_from_meta

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
    "assemble_soup_state",
    "assemble_state",
    "build_crossover",
    "build_group_soup",
    "check_compatible",
    "dedupe_epochs",
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
    "sweet_spot_heatmap",
    "sweet_spot_report",
    "val_only",
    "variant_spots",
    "window_members",
]
