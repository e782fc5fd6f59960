"""The stage functions run.py calls: analyse a training run, build its crossover, evaluate every method.

    report  = analyze(experiment_dir, out_dir)                 # sweet_spots.json + figures
    summary = crossover(experiment_dir, out_dir)               # crossover.safetensors + crossover.json
    results = evaluate_all(experiment_dir, out_dir)            # selection.json, results.csv, intervals.csv
    summary = summarize_seeds([results.csv, ...], out_dir)     # over seeds: mean ± std, paired differences,
                                                               # bootstrap intervals, the methods figure

Each reads the experiment afresh (metrics and manifests, not weights, plus a
sha256 of every checkpoint file; ``hashes=False`` checks sizes only, for a quick
look at a big run) and writes only under ``out_dir``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pandas as pd
import torch

from redheart_tune.analysis import figures
from redheart_tune.analysis.crossover import DEFAULT_DELTAS, build_crossover, variant_spots
from redheart_tune.analysis.evaluate import EvalSettings, EvaluationError, evaluate_methods, val_only
from redheart_tune.analysis.experiment import TrainingRun, load_training_run
from redheart_tune.analysis.seeds import (
    BASELINE,
    aggregate_seeds,
    load_row_scores,
    paired_differences,
    read_results,
    save_row_scores,
)
from redheart_tune.analysis.selection import select_methods
from redheart_tune.analysis.sweet_spots import select_sweet_spots, sweet_spot_report
from redheart_tune.analysis.uncertainty import interval_table
from redheart_tune.analysis.weights import broken_epochs, save_state_atomic
from redheart_tune.config import Config, cache_dir, config_from_dict, config_to_dict
from redheart_tune.data import HOLDOUT, EncodedData, normalise_text, prepare_data, prepare_holdout
from redheart_tune.util.files import write_atomic, write_json_atomic

SWEET_SPOTS_FILE = "sweet_spots.json"
CROSSOVER_WEIGHTS = "crossover.safetensors"
CROSSOVER_FILE = "crossover.json"
SELECTION_FILE = "selection.json"
RESULTS_FILE = "results.csv"
ROW_SCORES_FILE = "row_scores.npz"
INTERVALS_FILE = "intervals.csv"
INTERVALS_SUMMARY_FILE = "intervals_summary.csv"


def _skipped(run: TrainingRun) -> list[dict]:
    return [
        {"path": str(r.path), "epoch": r.epoch, "problem": r.problem}
        for r in run.checkpoints
        if not r.complete
    ]


def write_csv_atomic(df: pd.DataFrame, path: Path) -> Path:
    """A table as CSV (no index column), written atomically."""
    return write_atomic(path, lambda tmp: df.to_csv(tmp, index=False))


def analyze(
    experiment_dir: str | Path,
    out_dir: str | Path,
    *,
    rule: str = "spec",
    hashes: bool = True,
    trial: str | None = None,
) -> dict:
    """Phase 3: sweet spots of every unit (sweet_spots.json) and the learning-curve, heat-map and memory figures."""
    out = Path(out_dir)
    run = load_training_run(experiment_dir, hashes=hashes, trial=trial)
    spots = select_sweet_spots(run.checkpoint_table, rule=rule)
    report = sweet_spot_report(run.checkpoint_table, spots, run.details, rule=rule)
    report["experiment"] = str(run.path)
    report["checkpoints"] = {str(e): str(p) for e, p in run.complete.items()}
    report["skipped_checkpoints"] = _skipped(run)
    made = [
        figures.learning_curves_figure(run.epochs, out / "learning_curves.png", list(run.complete)),
        figures.sweet_spot_heatmap(run.modules, spots, out / "sweet_spot_heatmap.png"),
        figures.memory_figure(run.epochs, out / "memory.png", run.details),
    ]
    report["figures"] = [str(p) for p in made if p is not None]
    write_json_atomic(out / SWEET_SPOTS_FILE, report)
    return report


def crossover(
    experiment_dir: str | Path,
    out_dir: str | Path,
    deltas: Sequence[int] = DEFAULT_DELTAS,
    *,
    rule: str = "spec",
    save_variant_weights: bool = False,
    hashes: bool = True,
    trial: str | None = None,
) -> dict:
    """Phase 4: the crossover model's weights (crossover.safetensors) and crossover.json.

    crossover.json holds the sweet spots, the checkpoint each unit came from, the
    model config, tasks and input width (enough to rebuild the model with
    ``analysis.weights.model_from_meta``), and the ±Δ variants' sweet spots.
    The variants' weights are written too (``crossover_d<Δ>.safetensors``) only
    when ``save_variant_weights``: each is as big as the model, and each is
    rebuilt exactly from the checkpoints and its recorded spots.
    """
    out = Path(out_dir)
    run = load_training_run(experiment_dir, hashes=hashes, trial=trial)
    spots = select_sweet_spots(run.checkpoint_table, rule=rule)
    model, sources = build_crossover(spots, run.complete, run.meta, problems=broken_epochs(run))
    weights = save_state_atomic(model.state_dict(), out / CROSSOVER_WEIGHTS, metadata={"kind": "crossover"})
    variants = variant_spots(spots, deltas, sorted(run.complete))
    variant_files = {}
    if save_variant_weights:
        for delta, vspots in variants.items():
            vmodel, _ = build_crossover(vspots, run.complete, run.meta, problems=broken_epochs(run))
            path = out / f"crossover_d{delta:+d}.safetensors"
            variant_files[str(delta)] = str(save_state_atomic(vmodel.state_dict(), path, {"kind": "variant"}))
            del vmodel
    reference = run.meta[min(run.complete)]
    summary = {
        "experiment": str(run.path),
        "rule": rule,
        "weights": str(weights),
        "sweet_spots": spots,
        "sources": sources,
        "variants": {str(d): v for d, v in variants.items()},
        "variant_weights": variant_files,
        "config": reference["config"],
        "tasks": reference["tasks"],
        "input_dim": reference["input_dim"],
        "data_fingerprint": reference.get("data_fingerprint"),
        "skipped_checkpoints": _skipped(run),
    }
    write_json_atomic(out / CROSSOVER_FILE, summary)
    return summary


def evaluate_all(
    experiment_dir: str | Path,
    out_dir: str | Path,
    seed: int | None = None,
    *,
    k: int = 5,
    deltas: Sequence[int] = DEFAULT_DELTAS,
    rule: str = "spec",
    device: str | None = None,
    data: EncodedData | None = None,
    holdout: EncodedData | None | Literal["config"] = "config",
    cfg: Config | None = None,
    hashes: bool = True,
    trial: str | None = None,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Select every method on validation data (selection.json), score each once on the test split and on
    the second held-out set (results.csv, one row per method and set), with the per-row scores
    (row_scores.npz) and the paired bootstrap intervals and McNemar tests against the best single
    checkpoint (intervals.csv, ``analysis.uncertainty``).

    ``seed`` labels the rows; it must equal the training run's seed (None takes
    it from the checkpoints).  ``data`` is the run's EncodedData when the caller
    already has it; otherwise it is prepared from the run's config.  Its split
    fingerprint must equal the one the checkpoints were trained with, or the
    "test" rows might have been trained on.  ``holdout``: the second held-out set
    (``tune.data.prepare_holdout``), None for none, or "config" to prepare it as
    ``data.holdout`` says.  ``cfg``: the current configuration, whose ``analysis``
    section and ``data.holdout*`` settings apply (None: the run's stored one's).
    """

    out = Path(out_dir)
    run = load_training_run(experiment_dir, hashes=hashes, trial=trial)
    if not run.complete:
        raise EvaluationError(f"{run.path}: no complete checkpoint to evaluate")
    meta = run.meta[min(run.complete)]
    stored = config_from_dict(run.config if run.config is not None else meta["config"], str(run.path))
    current = cfg or stored
    run_seed = int(meta["seed"])
    if seed is not None and int(seed) != run_seed:
        raise EvaluationError(
            f"{run.path} was trained with seed {run_seed}, not {seed}; pass that run's seed"
        )
    if data is None:
        data = prepare_data(stored.data, cache_dir(stored), show_progress=False)
    trained_on = {m.get("data_fingerprint") for m in run.meta.values()}
    if trained_on != {data.fingerprint}:
        raise EvaluationError(
            f"{run.path}: checkpoints were trained on data split(s) {sorted(str(f)[:12] for f in trained_on)}, "
            f"but the data here is {data.fingerprint[:12]}; evaluate with the run's own data settings"
        )
    if holdout == "config":
        wanted = stored.data.model_copy(
            update={"holdout": current.data.holdout, "holdout_max_samples": current.data.holdout_max_samples}
        )
        holdout = prepare_holdout(wanted, cache_dir(stored), show_progress=show_progress)
    if holdout is not None:
        check_disjoint(data, holdout)
    settings = EvalSettings(
        tasks=data.tasks,
        task_weights=dict(stored.optim.task_weights),
        fusion_weights=dict(stored.model.fusion_weights),
        device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")),
        batch_size=stored.optim.eval_batch_size,
    )
    a = current.analysis
    plan = select_methods(
        run,
        val_only(data),
        settings,
        k=k,
        deltas=deltas,
        rule=rule,
        soup_window=a.soup_window,
        learned_fusion=a.learned_fusion,
    )
    sets = {"test": data} if holdout is None else {"test": data, HOLDOUT: holdout}
    write_json_atomic(
        out / SELECTION_FILE,
        {
            "experiment": str(run.path),
            "seed": run_seed,
            "k": k,
            "rule": rule,
            "analysis": config_to_dict(a),
            "scored_on": {
                split: {"rows": len(d.splits[split]), "fingerprint": d.fingerprint}
                for split, d in sets.items()
            },
            "plan": plan,
        },
    )
    results, values = evaluate_methods(plan, run, sets, settings)
    results.insert(1, "seed", run_seed)
    write_csv_atomic(results, out / RESULTS_FILE)
    ids = {split: [d.ids[i] for i in d.splits[split]] for split, d in sets.items()}
    save_row_scores(out / ROW_SCORES_FILE, values, ids)
    intervals = interval_table(
        {run_seed: values}, baseline=BASELINE, resamples=a.bootstrap_resamples, seed=a.bootstrap_seed
    )
    write_csv_atomic(intervals, out / INTERVALS_FILE)
    return results


def check_disjoint(data: EncodedData, holdout: EncodedData) -> None:
    """The held-out set shares no record and (when texts are known) no normalised text with ``data``."""

    shared = set(data.ids) & set(holdout.ids)
    if data.texts is not None and holdout.texts is not None:
        keys = {normalise_text(t) for t in data.texts}
        shared |= {i for i, t in zip(holdout.ids, holdout.texts, strict=True) if normalise_text(t) in keys}
    if shared:
        raise EvaluationError(
            f"the held-out set shares {len(shared)} record(s) or text(s) with the run's data (first: "
            f"{sorted(shared)[:3]}); it must come from tune.data.prepare_holdout of the same data settings"
        )


def summarize_seeds(
    result_files: Sequence[str | Path],
    out_dir: str | Path,
    metric: str = "emotion_accuracy",
    *,
    resamples: int = 10000,
    seed: int = 0,
) -> dict:
    """From several seeds' results.csv (each with its row_scores.npz beside it): mean ± std over seeds
    (results_summary.csv), paired differences against best_single (paired_differences.csv), the paired
    bootstrap intervals of the seed-averaged metrics and their differences with McNemar's test
    (intervals_summary.csv, ``resamples`` resamples seeded with ``seed``) and the methods figure.
    One seed's summary beside its own results.csv leaves out results_all_seeds.csv and
    intervals_summary.csv: they would repeat its results.csv and intervals.csv."""

    out = Path(out_dir)
    results = read_results(result_files)
    summary = aggregate_seeds(results)
    diffs = paired_differences(results)
    values, ids = {}, None
    for f in result_files:
        seeds = pd.read_csv(f)["seed"].unique()
        if len(seeds) != 1:
            raise EvaluationError(f"{f}: expected the results of one seed, found seeds {sorted(seeds)}")
        values[int(seeds[0])], seed_ids = load_row_scores(Path(f).with_name(ROW_SCORES_FILE))
        if ids is not None and seed_ids != ids:
            raise EvaluationError(
                f"{f}: scored on other sentences than {result_files[0]}; the seeds must share the data"
            )
        ids = seed_ids
    intervals = interval_table(values, baseline=BASELINE, resamples=resamples, seed=seed)
    one_seed_in_place = len(result_files) == 1 and out.resolve() == Path(result_files[0]).parent.resolve()
    if not one_seed_in_place:
        write_csv_atomic(results, out / "results_all_seeds.csv")
        write_csv_atomic(intervals, out / INTERVALS_SUMMARY_FILE)
    write_csv_atomic(summary, out / "results_summary.csv")
    write_csv_atomic(diffs, out / "paired_differences.csv")
    fig = figures.methods_figure(intervals, metric, out / f"methods_{metric}.png")
    return {"summary": summary, "paired_differences": diffs, "intervals": intervals, "figure": str(fig)}
