"""Several seeds: their results tables aggregated, the paired differences against the baseline, and
each seed's results.csv and per-row scores (for the intervals over seeds) on disk."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from redheart_tune.analysis.evaluate import EvaluationError, RowScores
from redheart_tune.util.files import write_atomic

BASELINE = "best_single"  # the paired differences over seeds are taken against it


def metric_columns(results: pd.DataFrame) -> list[str]:
    """The score columns of a results table (losses and task metrics)."""
    skip = {"method", "seed", "split", "rows", "members"}
    return [c for c in results.columns if c not in skip and pd.api.types.is_numeric_dtype(results[c])]


def _keys(results: pd.DataFrame) -> list[str]:
    """What one row of a results table is per seed: a method, on one split when the table has splits."""
    return ["method", "split"] if "split" in results.columns else ["method"]


def aggregate_seeds(results: pd.DataFrame) -> pd.DataFrame:
    """Per method (and split): number of seeds, and mean and sample std (ddof=1; NaN for one seed) of every score."""
    _check_results(results)
    cols = metric_columns(results)
    keys = _keys(results)
    grouped = results.groupby(keys, sort=False)[cols]
    mean = grouped.mean().add_suffix("_mean")
    std = grouped.std(ddof=1).add_suffix("_std")
    n = results.groupby(keys, sort=False)["seed"].nunique().rename("n_seeds")
    out = pd.concat([n, mean, std], axis=1)
    return out[["n_seeds", *[c for col in cols for c in (f"{col}_mean", f"{col}_std")]]].reset_index()


def paired_differences(results: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Per method (and split) and score: mean and std over seeds of (method − baseline), paired by seed.

    A seed where either side is missing is left out of that pair, and ``n_pairs`` says how many remain.
    """
    _check_results(results)
    if baseline not in set(results["method"]):
        raise EvaluationError(
            f"baseline {baseline!r} is not among the methods {sorted(set(results['method']))}"
        )
    cols = metric_columns(results)
    splits = results["split"].drop_duplicates().tolist() if "split" in results.columns else [None]
    rows = []
    for split in splits:
        part = results if split is None else results[results["split"] == split]
        wide = part.set_index(["seed", "method"])[cols]
        base = wide.xs(baseline, level="method")
        for method in part["method"].drop_duplicates():
            if method == baseline:
                continue
            diff = (wide.xs(method, level="method") - base).dropna(how="all")
            for col in cols:
                d = diff[col].dropna()
                rows.append(
                    {
                        "method": method,
                        **({} if split is None else {"split": split}),
                        "metric": col,
                        "n_pairs": len(d),
                        "mean_diff": float(d.mean()) if len(d) else float("nan"),
                        "std_diff": float(d.std(ddof=1)) if len(d) > 1 else float("nan"),
                    }
                )
    return pd.DataFrame(rows)


def _check_results(results: pd.DataFrame) -> None:
    missing = {"method", "seed"} - set(results.columns)
    if missing:
        raise EvaluationError(f"results table lacks column(s) {sorted(missing)}")
    keys = ["seed", *_keys(results)]
    dup = results.duplicated(subset=keys)
    if dup.any():
        raise EvaluationError(
            f"results hold a method twice for one seed: {results.loc[dup, keys].values.tolist()}"
        )


def read_results(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate several runs' results.csv (one per seed)."""
    frames = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise EvaluationError(f"{p}: no such results file; run the evaluation of that seed first")
        frames.append(pd.read_csv(p))
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------
# Per-row values on disk (for the intervals over seeds)


def save_row_scores(path: Path, values: RowScores, ids: Mapping[str, Sequence[str]]) -> Path:
    """``values`` and each split's row ids as one .npz (``<split>/<method>/<metric>``, ``<split>/ids``)."""
    arrays = {
        f"{split}/{m}/{k}": v for split, by in values.items() for m, per in by.items() for k, v in per.items()
    }
    arrays.update({f"{split}/ids": np.asarray(list(ids[split]), dtype=str) for split in values})

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would add ".npz" to a name
            np.savez_compressed(f, **arrays)

    return write_atomic(Path(path), write)


def load_row_scores(path: Path) -> tuple[RowScores, dict[str, list[str]]]:
    """What ``save_row_scores`` wrote: (values, ids per split)."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(
            f"{path}: no per-row scores; rerun that seed's evaluation (python run.py report)"
        )
    values: RowScores = {}
    ids: dict[str, list[str]] = {}
    with np.load(path, allow_pickle=False) as f:
        for key in f.files:
            split, rest = key.split("/", 1)
            if rest == "ids":
                ids[split] = f[key].tolist()
            else:
                method, metric = rest.split("/")
                values.setdefault(split, {}).setdefault(method, {})[metric] = f[key]
    return values, ids
