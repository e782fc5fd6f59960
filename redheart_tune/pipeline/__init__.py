"""The stages each command runs, the run's status and the driver's run lock.

    from redheart_tune.pipeline import analyze, crossover, evaluate_all
    report = analyze("runs/redheart/train", "runs/redheart/analysis")
    summary = crossover("runs/redheart/train", "runs/redheart/final")
    results = evaluate_all("runs/redheart/train", "runs/redheart/analysis")   # test split and held-out set

The names load on first use: ``redheart_tune.pipeline.runlock`` and the CLI's config check import no torch.
"""

__all__ = ["analyze", "crossover", "evaluate_all", "summarize_seeds"]


def __getattr__(name: str):
    if name in __all__:
        from redheart_tune.pipeline import analysis

        return getattr(analysis, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
