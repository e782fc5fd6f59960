"""The pipeline's stages as the command line runs them: each prepares what it needs, runs, prints, writes.

run.py parses the arguments and calls one of these; every output goes under the
run's own directory (``tune.layout``).

    sweep_stage(cfg)                              phase 1 and its figure
    train_stage(cfg, lr_source)                   phase 2 at cfg.optim.lr (tune.train.choose_lr picks it)
    resume_stage(path)                            continue an interrupted sweep or training experiment
    analyze_stage(cfg), crossover_stage(cfg), report_stage(cfg)
    all_stages(cfg, seeds=..., explicit_lr=...)   every stage, for one seed or several

``USER_ERRORS`` are the errors a user can cause (config, data, experiment state,
checkpoints, selection, evaluation): run.py prints them as one message.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from redheart_tune.analysis.evaluate import EvaluationError
from redheart_tune.analysis.experiment import ExperimentReadError
from redheart_tune.analysis.figures import learning_curves_figure, lr_sweep_figure
from redheart_tune.analysis.seeds import BASELINE
from redheart_tune.analysis.sweet_spots import SweetSpotError
from redheart_tune.analysis.weights import CrossoverError
from redheart_tune.config import Config, ConfigError, RunConfigSection, cache_dir, is_uri
from redheart_tune.data import DataError, prepare_data
from redheart_tune.data.background import HoldoutJob, start_holdout_encoding
from redheart_tune.engine.checkpoints import CheckpointError
from redheart_tune.engine.memory import PlanError, cpu_budget, plan_for, planning_budget
from redheart_tune.layout import (
    CONFIG_FILE,
    analysis_dir,
    best_lr_path,
    experiment_dir,
    final_dir,
    seeds_dir,
    sweep_outputs_dir,
)
from redheart_tune.pipeline.analysis import (
    RESULTS_FILE,
    SWEET_SPOTS_FILE,
    analyze,
    crossover,
    evaluate_all,
    summarize_seeds,
)
from redheart_tune.pipeline.runlock import RunInUse, run_lock
from redheart_tune.tune.recovery import ExperimentError, checkpoint_epochs
from redheart_tune.tune.resources import cluster_address
from redheart_tune.tune.runner import dedupe_epochs
from redheart_tune.tune.storage import pull, push
from redheart_tune.tune.stored_config import resume_config
from redheart_tune.tune.sweep import SweepResult, run_sweep
from redheart_tune.tune.train import run_train, run_train_seeds, with_lr

USER_ERRORS = (
    ConfigError,
    PlanError,
    DataError,
    ExperimentError,
    ExperimentReadError,
    CheckpointError,
    CrossoverError,
    SweetSpotError,
    EvaluationError,
    RunInUse,
)


def _prepare(cfg: Config) -> HoldoutJob | None:
    """Fetch, validate and encode the data in the driver, with a progress bar, before any trial starts;
    check that the model fits its memory budget (a plan that cannot fit fails here, not in a trial).
    Start encoding the held-out set in the background, for ``report`` (None: nothing to encode)."""
    data = prepare_data(cfg.data, cache_dir(cfg), show_progress=True)
    print(f"[data] {data.summary()}")
    on_gpu = cfg.resources.gpu > 0 and (bool(cluster_address(cfg)) or torch.cuda.is_available())
    budget = planning_budget(cfg.memory) if on_gpu else cpu_budget(cfg.memory)
    plan, _ = plan_for(cfg, data.tasks, data.input_dim, device="cuda" if on_gpu else "cpu", budget=budget)
    if plan.strategy == "stream":
        print(
            f"[memory] {len(plan.streamed)} of {len(plan.units)} units stream through the "
            f"{budget.bytes / 2**30:.2f} GiB budget ({', '.join(plan.streamed) or 'none yet'}); estimated peak "
            f"{(plan.peak_bytes + plan.context_bytes) / 2**30:.2f} GiB, {plan.transfer_bytes_per_step / 2**30:.2f} "
            "GiB moved per optimizer step (python run.py params prints the plan)"
        )
    return start_holdout_encoding(cfg.data, cache_dir(cfg))


def _table(df: pd.DataFrame) -> str:
    return df.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def sweep_stage(cfg: Config) -> SweepResult:
    """Run (or finish, or reuse) the sweep, draw its figure, print every candidate's score."""
    holdout = _prepare(cfg)
    sweep = run_sweep(cfg)
    fig = lr_sweep_figure(sweep.rows(), sweep.best.lr, sweep_outputs_dir(cfg) / "lr_sweep.png")
    push(cfg, sweep_outputs_dir(cfg))
    print("[sweep] scores (lower is better):")
    for c in sweep.candidates:
        mark = "  <- chosen" if c is sweep.best else ""
        final_acc = c.history["val_acc"].iloc[-1]
        print(f"    lr {c.lr:.2e}: score {c.score:.4f}  final val acc {final_acc:.3f}  ({c.trial}){mark}")
    print(f"[sweep] chosen LR: {sweep.best.lr:.2e}  -> {best_lr_path(cfg)}\n[sweep] figure: {fig}")
    if holdout is not None:
        print(holdout.state())
    return sweep


def train_stage(cfg: Config, lr_source: str, *, resume_unfinished: bool = False) -> None:
    """Train (or reuse, or resume) at ``cfg.optim.lr``, then draw the learning curves."""
    holdout = _prepare(cfg)
    results = run_train(cfg, lr_source, resume_unfinished=resume_unfinished)
    # From Tune's records, not the checkpoint files (a remote run's weights stay where they are).
    epochs = dedupe_epochs(results[0].metrics_dataframe)
    checkpoints = sorted(int(m["epoch"]) for _, m in results[0].best_checkpoints)
    if Path(results[0].path).is_dir():  # local: a recovered trial's Tuner records only what it wrote
        checkpoints = sorted(set(checkpoints) | set(checkpoint_epochs(Path(results[0].path))))
    fig = learning_curves_figure(epochs, analysis_dir(cfg) / "learning_curves.png", checkpoints)
    push(cfg, fig, fig.with_suffix(".csv"))
    print(
        f"[train] finished: {results[0].path}\n[train] {len(checkpoints)} checkpoints; learning curves: {fig}"
    )
    if holdout is not None:
        print(holdout.state())


def resume_stage(where: str | Path, overrides: list[str] | None = None) -> None:
    """Continue the sweep or training experiment at ``where`` (a local ``<run dir>/<stage>`` or its URI in
    remote storage) with the config it was started with, and the ``overrides`` a resume may make
    (``tune.stored_config.resume_config``)."""
    path, located = _experiment_at(str(where))
    seeds = _stored_record(path).get("seeds")
    if seeds is not None:  # its trials are seeds of one run, and its analysis belongs to `all`
        raise ExperimentError(
            f"{where} holds the further seeds {seeds} of `all --seeds {len(seeds) + 1}`; continue them with "
            f"python run.py all --seeds {len(seeds) + 1} and the run's config and overrides"
        )
    # One driver at a time on the run (<run dir>/<stage>), before the resume writes anything; a path that
    # holds no experiment is refused by resume_config as it was.
    with run_lock(path.parent, path.parent.name) if _stored_record(path) else contextlib.nullcontext():
        cfg, stage = resume_config(path, list(overrides or []))
        if not located:  # a local run directory, wherever it is now: <output_root>/<run.name>/<stage>
            run = cfg.run.model_copy(
                update={"output_root": str(path.parent.parent), "name": path.parent.name}
            )
            cfg = cfg.model_copy(update={"run": run})
        print(f"[resume] {stage} experiment {where}")
        if stage == "sweep":
            sweep_stage(cfg)
        else:
            train_stage(cfg, "the experiment's stored config", resume_unfinished=True)


def _experiment_at(where: str) -> tuple[Path, bool]:
    """The local path of the experiment at ``where``, and whether its stored config already says where its
    run lives (a URI, or a local mirror of one)."""
    if not is_uri(where):
        path = Path(where).expanduser().resolve()
        return path, is_uri(_stored_root(path) or "")
    base, _, query = where.partition("?")
    root, name, stage = base.rstrip("/").rsplit("/", 2)
    probe = Config(run=RunConfigSection(output_root=f"{root}?{query}" if query else root, name=name))
    path = pull(probe, experiment_dir(probe, stage) / CONFIG_FILE).parent
    return path, True


def _stored_record(path: Path) -> dict:
    """The experiment's stored config record (``{}`` when there is none: resume_config says so)."""
    f = path / CONFIG_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _stored_root(path: Path) -> str | None:
    record = _stored_record(path)
    return record["config"]["run"]["output_root"] if record else None


@dataclass(frozen=True)
class Trained:
    """One trained model to analyse: its experiment (and its trial, for one of several seeds) and where
    its analysis and crossover go."""

    experiment: Path
    trial: str | None
    analysis: Path
    final: Path
    seed: int
    name: str


def _trained(cfg: Config) -> Trained:
    """The run's own training, in the local root (its checkpoints downloaded from a remote one)."""
    experiment = pull(cfg, experiment_dir(cfg, "train"), weights=True)
    if not experiment.is_dir():  # analyze, crossover or report before any training: say what to run
        raise ExperimentReadError(
            f"{experiment}: no training yet; run `python run.py train` first, with the same config file "
            "and overrides as this command"
        )
    return Trained(experiment, None, analysis_dir(cfg), final_dir(cfg), cfg.run.seed, cfg.run.name)


def _analyze(cfg: Config, t: Trained) -> None:
    report = analyze(t.experiment, t.analysis, trial=t.trial)
    push(cfg, t.analysis)
    print(f"[analyze] {t.name}: sweet spots (epoch per group / independent module):")
    for unit, epoch in report["sweet_spots"].items():
        print(f"    {unit:<18} epoch {epoch}")
    for skipped in report["skipped_checkpoints"]:
        print(f"[analyze] skipped {skipped['path']}: {skipped['problem']}")
    print(f"[analyze] {t.analysis / SWEET_SPOTS_FILE}; figures: {', '.join(report['figures'])}")


def _crossover(cfg: Config, t: Trained) -> None:
    summary = crossover(t.experiment, t.final, trial=t.trial)
    push(cfg, t.final)
    print(f"[crossover] {t.name}: the epoch each unit comes from, in the model and in its variants:")
    print(_indented(_table(crossover_table(summary))))
    print(f"[crossover] weights: {summary['weights']}")


def crossover_table(summary: dict) -> pd.DataFrame:
    """One row per unit: its sweet spot (the crossover model's epoch) and each variant's (a column per Δ)."""
    table = pd.DataFrame(
        {"unit": list(summary["sweet_spots"]), "epoch": list(summary["sweet_spots"].values())}
    )
    for delta, spots in summary["variants"].items():
        table[f"variant {int(delta):+d}"] = [spots[u] for u in table["unit"]]
    return table


def _indented(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())


def _evaluate(cfg: Config, t: Trained) -> Path:
    """Evaluation of every method on the test split and the held-out set; prints the tables, returns
    results.csv."""
    results = evaluate_all(t.experiment, t.analysis, seed=t.seed, trial=t.trial, cfg=cfg, show_progress=True)
    push(cfg, t.analysis)
    cols = [c for c in results.columns if c.endswith(("_accuracy", "_mae")) or c == "fused_loss"]
    for split, part in results.groupby("split", sort=False):
        print(f"[report] {t.name}: {split}, {part['rows'].iloc[0]:,} rows (selection used validation only):")
        print(_table(part[["method", "seed", *cols]]))
    return t.analysis / RESULTS_FILE


def _mean_std(summary: pd.DataFrame) -> str:
    """The summary's task metrics and fused loss as 'mean ± std' (std left out for one seed)."""
    cols = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean") and c != "model_loss_mean"]
    out = summary[[c for c in ("method", "split", "n_seeds") if c in summary.columns]].copy()
    for c in cols:
        mean, std = summary[f"{c}_mean"], summary[f"{c}_std"]
        out[c] = [f"{m:.4f}" + ("" if pd.isna(d) else f" ± {d:.4f}") for m, d in zip(mean, std, strict=True)]
    return out.to_string(index=False)


def _print_intervals(intervals: pd.DataFrame, tag: str) -> None:
    """Each method's difference against the best single checkpoint with its 95 % interval, per set."""
    for split, part in intervals[intervals["method"] != BASELINE].groupby("split", sort=False):
        print(
            f"[{tag}] {split}: difference against the best single checkpoint [95 % paired bootstrap interval]"
        )
        for method, rows in part.groupby("method", sort=False):
            cells = []
            for r in rows.itertuples():
                cell = f"{r.metric} {r.diff:+.4f} [{r.diff_low:+.4f}, {r.diff_high:+.4f}]"
                if pd.notna(r.mcnemar_p):
                    cell += f" McNemar p {r.mcnemar_p:.3g}"
                cells.append(cell)
            print(f"    {method:<19} " + "; ".join(cells))


def _summarize(cfg: Config, result_files: list[Path], out: Path) -> dict:
    a = cfg.analysis
    return summarize_seeds(result_files, out, resamples=a.bootstrap_resamples, seed=a.bootstrap_seed)


def analyze_stage(cfg: Config) -> None:
    _analyze(cfg, _trained(cfg))


def crossover_stage(cfg: Config) -> None:
    _crossover(cfg, _trained(cfg))


def report_stage(cfg: Config) -> None:
    results = _evaluate(cfg, _trained(cfg))
    summary = _summarize(cfg, [results], analysis_dir(cfg))
    push(cfg, analysis_dir(cfg))
    _print_intervals(summary["intervals"], "report")
    print(f"[report] {results}; figure: {summary['figure']}")


def all_stages(cfg: Config, *, seeds: int = 1, explicit_lr: bool = False) -> None:
    """sweep -> train -> analyze -> crossover -> report, for ``seeds`` seeds; finished stages are reused,
    an interrupted one resumed.  The first seed is ``cfg``'s run; the further seeds train at the same LR
    (the sweep runs once) as the trials of one Tune experiment, ``<run dir>/seeds/train``, in parallel
    as far as the resources allow, and each is analysed into ``<run dir>/seeds/seed<k>/``.
    ``explicit_lr``: optim.lr was given, so there is no sweep."""
    if explicit_lr:
        lr, source = cfg.optim.lr, "command line (optim.lr)"
        print(f"[all] optim.lr={lr:g} given on the command line: no LR sweep")
    else:
        lr, source = sweep_stage(cfg).best.lr, str(best_lr_path(cfg))
    base = with_lr(cfg, lr)
    train_stage(base, source, resume_unfinished=True)
    trained = [_trained(base)]
    others = [cfg.run.seed + k for k in range(1, seeds)]
    if others:
        run_train_seeds(base, others, source)
        experiment = pull(cfg, seeds_dir(cfg) / "train", weights=True)
        for seed in others:
            out = seeds_dir(cfg) / f"seed{seed}"
            trained.append(
                Trained(experiment, f"seed{seed}_", out / "analysis", out / "final", seed, f"seed {seed}")
            )
    result_files = []
    for t in trained:
        _analyze(cfg, t)
        _crossover(cfg, t)
        result_files.append(_evaluate(cfg, t))
    out = analysis_dir(cfg) if seeds == 1 else analysis_dir(cfg) / "seeds"
    summary = _summarize(cfg, result_files, out)
    push(cfg, out)
    print(f"[all] mean ± std over {seeds} seed(s):\n{_mean_std(summary['summary'])}")
    _print_intervals(summary["intervals"], "all")
    print(f"[all] tables in {out}; figure: {summary['figure']}")


BY_NAME = {
    "sweep": sweep_stage,
    "analyze": analyze_stage,
    "crossover": crossover_stage,
    "report": report_stage,
}
"""The stages that take only a config, by their command name."""
