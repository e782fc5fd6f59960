"""Red Heart pipeline: one subcommand per stage.

    python run.py sweep  [config.yaml] [key=value ...]   phase 1: the five-LR sweep (Ray Tune)
    python run.py train  [config.yaml] [key=value ...]   phase 2: one long Tune trial, checkpoints every 2 epochs
    python run.py resume [experiment_dir]                continue an interrupted sweep or training run
    python run.py analyze   [config.yaml] [key=value ...] phase 3: sweet spots, learning curves, heat map
    python run.py crossover [config.yaml] [key=value ...] phase 4: the crossover model and its variants
    python run.py report    [config.yaml] [key=value ...] test-split evaluation of crossover, ensemble, baselines
    python run.py all       [config.yaml] [key=value ...] [--seeds N]   every stage; finished ones are skipped
    python run.py status    [config.yaml] [key=value ...] progress of the training run
    python run.py params    [config.yaml] [--json]        parameters per module and group, memory estimate

The config defaults to configs/default.yaml; ``key=value`` overrides any field
(``python run.py sweep configs/default.yaml sweep.epochs=3``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


def _split_args(args: list[str]) -> tuple[Path, list[str]]:
    """The first argument not containing '=' is the config file; the rest are overrides."""
    config, overrides = None, []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif config is None:
            config = Path(a)
        else:
            raise SystemExit(f"error: unexpected argument {a!r} (one config file, then key=value overrides)")
    return config or DEFAULT_CONFIG, overrides


def _load(args: list[str]):
    from tune.config import load_config

    path, overrides = _split_args(args)
    return load_config(path, overrides), overrides


def _prepare(cfg) -> None:
    """Fetch, validate and encode the data in the driver, with a progress bar, before any trial starts."""
    from tune.config import cache_dir
    from tune.data import prepare_data

    data = prepare_data(cfg.data, cache_dir(cfg), show_progress=True)
    counts = {k: len(v) for k, v in data.splits.items()}
    print(
        f"[data] {cfg.data.source}: {sum(counts.values())} records, split {counts}, fingerprint {data.fingerprint[:12]}"
    )


def cmd_sweep(args: list[str]) -> None:
    from tune.resources import start_ray

    cfg, _ = _load(args)
    _prepare(cfg)
    start_ray(cfg)
    _sweep(cfg)


def _sweep(cfg) -> None:
    """Run (or reuse) the sweep, draw its figure, print every candidate's score."""
    import pandas as pd

    from analysis.figures import lr_sweep_figure
    from tune.sweep import best_lr_path, run_sweep, sweep_dir

    best = run_sweep(cfg)
    rows = pd.read_csv(sweep_dir(cfg) / "lr_sweep_all.csv")
    fig = lr_sweep_figure(rows, best.lr, sweep_dir(cfg) / "lr_sweep.png")
    scores = json.loads(best_lr_path(cfg).read_text())["candidates"]
    print("\n[sweep] scores (lower is better):")
    for c in scores:
        mark = "  <- chosen" if c["lr"] == best.lr else ""
        print(f"    lr {c['lr']:.1e}: score {c['score']:.4f}  final val acc {c['final_val_acc']:.3f}{mark}")
    print(f"[sweep] chosen LR: {best.lr:.1e}  -> {best_lr_path(cfg)}\n[sweep] figure: {fig}")


def cmd_train(args: list[str]) -> None:
    from tune.resources import start_ray
    from tune.train import run_train

    cfg, overrides = _load(args)
    _prepare(cfg)
    start_ray(cfg)
    results = run_train(cfg, lr_from_command_line=any(o.startswith("optim.lr=") for o in overrides))
    _after_training(cfg, results)


def _after_training(cfg, results) -> None:
    """The learning-curve figure of a finished training run."""
    from analysis import learning_curves_figure, load_training_run
    from tune.config import output_root
    from tune.runner import experiment_dir

    run = load_training_run(experiment_dir(cfg, "train"), hashes=False)
    fig = learning_curves_figure(
        run.epochs, output_root(cfg) / "analysis" / "learning_curves.png", list(run.complete)
    )
    print(
        f"[train] finished: {results[0].path}\n[train] {len(run.complete)} checkpoints; learning curves: {fig}"
    )


def cmd_resume(args: list[str]) -> None:
    from tune.resources import start_ray
    from tune.runner import experiment_dir, load_experiment_config
    from tune.sweep import run_sweep
    from tune.train import run_train

    if len(args) > 1:
        raise SystemExit("usage: python run.py resume [experiment_dir]")
    if args:
        path = Path(args[0])
    else:
        from tune.config import load_config

        path = experiment_dir(load_config(DEFAULT_CONFIG), "train")
    cfg, stage = load_experiment_config(path)
    print(f"[resume] {stage} experiment {path}")
    _prepare(cfg)
    start_ray(cfg)
    if stage == "sweep":
        run_sweep(cfg)
    else:
        _after_training(cfg, run_train(cfg, resume=True))


def _analysis_dir(cfg):
    from tune.config import output_root

    return output_root(cfg) / "analysis"


def cmd_analyze(args: list[str]) -> None:
    from analysis import analyze
    from tune.runner import experiment_dir

    cfg, _ = _load(args)
    report = analyze(experiment_dir(cfg, "train"), _analysis_dir(cfg))
    print("[analyze] sweet spots (epoch per group / independent module):")
    for unit, epoch in report["sweet_spots"].items():
        print(f"    {unit:<18} epoch {epoch}")
    for skipped in report["skipped_checkpoints"]:
        print(f"[analyze] skipped {skipped['path']}: {skipped['problem']}")
    print(f"[analyze] {_analysis_dir(cfg) / 'sweet_spots.json'}; figures: {', '.join(report['figures'])}")


def cmd_crossover(args: list[str]) -> None:
    from analysis import crossover
    from tune.config import output_root
    from tune.runner import experiment_dir

    cfg, _ = _load(args)
    summary = crossover(experiment_dir(cfg, "train"), output_root(cfg) / "final")
    print(f"[crossover] sweet spots {summary['sweet_spots']}")
    for delta, spots in summary["variants"].items():
        print(f"[crossover] variant {int(delta):+d}: {spots}")
    print(f"[crossover] weights: {summary['weights']}")


def _evaluate(cfg, out_dir):
    from analysis import evaluate_all
    from tune.runner import experiment_dir

    return evaluate_all(experiment_dir(cfg, "train"), out_dir, seed=cfg.run.seed)


def _print_results(results) -> None:
    cols = [c for c in results.columns if c.endswith(("_accuracy", "_mae")) or c == "fused_loss"]
    print(results[["method", "seed", *cols]].to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def cmd_report(args: list[str]) -> None:
    from analysis import summarize_seeds

    cfg, _ = _load(args)
    results = _evaluate(cfg, _analysis_dir(cfg))
    print("[report] test split (selection used validation only):")
    _print_results(results)
    summary = summarize_seeds([_analysis_dir(cfg) / "results.csv"], _analysis_dir(cfg))
    print(f"[report] {_analysis_dir(cfg) / 'results.csv'}; figure: {summary['figure']}")


def cmd_all(args: list[str]) -> None:
    """sweep -> train -> analyze -> crossover -> report; finished stages are reused, an interrupted one resumed."""
    from analysis import analyze, crossover, summarize_seeds
    from tune.config import load_config, output_root
    from tune.resources import start_ray
    from tune.runner import experiment_dir
    from tune.train import is_finished, run_train

    seeds = 1
    if "--seeds" in args:
        i = args.index("--seeds")
        seeds = int(args[i + 1])
        args = args[:i] + args[i + 2 :]
    base, _ = _load(args)
    _prepare(base)
    start_ray(base)
    _sweep(base)
    result_files = []
    for k in range(seeds):
        seed = base.run.seed + k
        # The first seed is the base run itself (reused if already trained); others get their own names.
        extra = [] if k == 0 else [f"run.seed={seed}", f"run.name={base.run.name}-seed{seed}"]
        path, ov = _split_args(args)
        cfg = load_config(path, [*ov, *extra])
        out = _analysis_dir(cfg) if seeds == 1 else _analysis_dir(cfg) / f"seed{seed}"
        exp = experiment_dir(cfg, "train")
        results = run_train(cfg, resume=is_finished(exp) is False)
        _after_training(cfg, results)
        analyze(exp, out)
        crossover(exp, output_root(cfg) / "final" if seeds == 1 else out / "final")
        results = _evaluate(cfg, out)
        print(f"[all] seed {seed}: test split")
        _print_results(results)
        result_files.append(out / "results.csv")
    summary = summarize_seeds(result_files, _analysis_dir(base))
    print("[all] mean ± std over seeds:")
    print(summary["summary"].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if seeds > 1:
        print("[all] paired difference against the best single checkpoint:")
        print(summary["paired_differences"].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"[all] figure: {summary['figure']}")


def cmd_status(args: list[str]) -> None:
    """Progress of the training run: epoch / total, latest checkpoint, peak memory, errors."""
    import pandas as pd

    from tune.runner import experiment_dir, experiment_state

    cfg, _ = _load(args)
    exp = experiment_dir(cfg, "train")
    state = experiment_state(exp)
    if state is None:
        print(f"[status] no training experiment at {exp} yet")
        return
    for trial_dir in sorted(p for p in exp.iterdir() if p.is_dir()):
        progress = trial_dir / "progress.csv"
        if not progress.is_file():
            continue
        df = pd.read_csv(progress).drop_duplicates("epoch", keep="last")
        last = df.iloc[-1]
        total = cfg.train.epochs
        ckpts = sorted(trial_dir.glob("checkpoint_*"))
        print(f"[status] {trial_dir.name}: {', '.join(sorted(set(state.values())))}")
        print(
            f"    epoch {int(last['epoch'])}/{total} ({100 * last['epoch'] / total:.0f} %), val loss {last['val_loss']:.4f}, "
            f"val acc {last['val_acc']:.3f}, peak memory {last['peak_memory_mb']:.0f} MB ({last['memory_kind']})"
        )
        print(f"    checkpoints: {len(ckpts)}, latest {ckpts[-1] if ckpts else '-'}")
        err = trial_dir / "error.txt"
        if err.is_file():
            tail = err.read_text().splitlines()[-100:]
            hits = [line for line in tail if "Error" in line or "out of memory" in line]
            print("    ERRORS:\n      " + "\n      ".join(hits[-5:] or tail[-3:]))


def cmd_params(args: list[str]) -> None:
    from model.report import format_params_report, params_report
    from tune.data import task_specs
    from tune.data.encoding import ENCODER_DIMS

    as_json = "--json" in args
    cfg, _ = _load([a for a in args if a != "--json"])
    report = params_report(cfg.model, task_specs(cfg.data.source), input_dim=ENCODER_DIMS[cfg.data.encoder])
    print(json.dumps(report, indent=2) if as_json else format_params_report(report))


COMMANDS = {
    "sweep": cmd_sweep,
    "train": cmd_train,
    "resume": cmd_resume,
    "analyze": cmd_analyze,
    "crossover": cmd_crossover,
    "report": cmd_report,
    "all": cmd_all,
    "status": cmd_status,
    "params": cmd_params,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="config file, then key=value overrides")
    ns = parser.parse_args(argv)
    from tune.config import ConfigError
    from tune.data import DataError
    from tune.runner import ExperimentError

    try:
        COMMANDS[ns.command](ns.args)
    except (ConfigError, DataError, ExperimentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted; Ray is shut down. Continue with: python run.py resume <experiment>",
            file=sys.stderr,
        )
        return 130
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
