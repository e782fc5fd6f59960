"""How sure a difference between two methods is: paired bootstrap intervals and McNemar's test.

Everything works on *per-row values*: for each test sentence and task, 1.0 / 0.0
(the fused prediction is right / wrong: an accuracy metric) or its absolute error
(an MAE metric), NaN where the row has no target for that task.  The methods are
scored on the same sentences, so every comparison is paired.

- ``interval_table`` resamples the sentences with replacement ``resamples`` times
  (one seeded set of resamples, shared by every method, seed and metric: the
  differences are paired) and reports the percentile 95 % interval of each
  method's metric and of its difference against the baseline.  With several
  training seeds the statistic is the mean over the seeds, each resample applied
  to every seed's predictions of the same sentences: the interval says how much
  the choice of test sentences moves the seed-averaged number, for these seeds.
- ``mcnemar_exact`` is McNemar's exact test (the two-sided binomial test on the
  discordant pairs, no continuity correction needed) for an accuracy metric;
  ``mcnemar_agreeing`` combines the seeds' tests into one p that every seed differs
  in the same direction.

    table = interval_table({0: {"test": {"crossover": {"emotion_accuracy": values, ...}, ...}}},
                           baseline="best_single", resamples=10_000, seed=0)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import binom

LEVEL = 0.95
CHUNK = 500
"""Resamples drawn at once (a (CHUNK, N) count matrix: 55 MB for N = 13,700 in float64)."""

RowValues = Mapping[int, Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]]
"""``values[seed][split][method][metric]``: (N,) per-row values, NaN where the row has no target."""


def is_accuracy(metric: str) -> bool:
    return metric.endswith("_accuracy")


def mcnemar_exact(base: np.ndarray, other: np.ndarray) -> tuple[int, int, float]:
    """McNemar's exact test of two classifiers on the same rows (1.0 right, 0.0 wrong, NaN left out).

    Returns (b, c, p): b rows only ``base`` got right, c rows only ``other`` got right, and the two-sided
    p-value of b against Binomial(b + c, 1/2) (1.0 when no row is discordant).
    """
    both = ~(np.isnan(base) | np.isnan(other))
    x, y = base[both] > 0.5, other[both] > 0.5
    b, c = int((x & ~y).sum()), int((~x & y).sum())
    if b + c == 0:
        return b, c, 1.0
    return b, c, float(min(1.0, 2.0 * binom.cdf(min(b, c), b + c, 0.5)))


def mcnemar_agreeing(tests: Sequence[tuple[int, int, float]]) -> float:
    """One p for McNemar's test over several seeds: that every seed differs from the baseline in the
    direction of the summed difference (c − b), an intersection-union test.

    Twice the largest one-sided exact p of any seed in that direction, capped at 1.  For one seed it
    is ``mcnemar_exact``'s two-sided p; a seed that goes the other way makes it about 1 (the largest
    two-sided p of the seeds would call two seeds that disagree, each clearly, significant).
    """
    direction = sum(c - b for b, c, _ in tests)
    if direction == 0:
        return 1.0
    worst = 0.0
    for b, c, _ in tests:
        toward, away = (c, b) if direction > 0 else (b, c)
        worst = max(worst, float(binom.sf(toward - 1, toward + away, 0.5)) if toward + away else 1.0)
    return min(1.0, 2.0 * worst)


def resample_counts(n: int, resamples: int, seed: int, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """Bootstrap resamples of ``n`` rows as count matrices (b, n) float64, ``resamples`` rows in all:
    row r counts how often each row was drawn in resample r.  The same ``seed`` gives the same resamples."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < resamples:
        b = min(chunk, resamples - done)
        draws = rng.integers(0, n, size=(b, n))  # (b, n) row indices
        offsets = (np.arange(b) * n)[:, None]
        yield np.bincount((draws + offsets).ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        done += b


def _check_rows(values: RowValues, split: str) -> int:
    """The number of rows of ``split``, the same for every seed, method and metric; and the same methods
    and metrics for every seed."""
    first = values[min(values)][split]
    layout = {m: sorted(v) for m, v in first.items()}
    for seed, by_split in values.items():
        if split not in by_split:
            raise ValueError(f"seed {seed} has no per-row values of split {split!r} (has {sorted(by_split)})")
        if {m: sorted(v) for m, v in by_split[split].items()} != layout:
            raise ValueError(
                f"split {split!r}: seed {seed} has other methods or metrics than seed {min(values)}"
            )
    lengths = {
        len(v) for by_split in values.values() for per in by_split[split].values() for v in per.values()
    }
    if len(lengths) != 1:
        raise ValueError(f"split {split!r}: per-row values of different lengths {sorted(lengths)}")
    return lengths.pop()


def interval_table(
    values: RowValues, *, baseline: str, resamples: int, seed: int, level: float = LEVEL
) -> pd.DataFrame:
    """Per split, method and metric: the metric (mean over seeds) and its ``level`` bootstrap interval, the
    paired difference against ``baseline`` and its interval, and for an accuracy metric McNemar's exact
    test against the baseline (b, c summed over the seeds; ``mcnemar_p`` the test that every seed differs
    in the same direction, ``mcnemar_agreeing``; ``mcnemar_p_each`` every seed's two-sided p and
    ``mcnemar_bc_each`` its b/c).  Every seed must have the same methods and rows per split."""
    seeds = sorted(values)
    splits = list(values[seeds[0]])
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    rows = []
    for split in splits:
        methods = list(values[seeds[0]][split])
        if baseline not in methods:
            raise ValueError(f"baseline {baseline!r} is not among the methods {methods}")
        metrics = list(values[seeds[0]][split][baseline])
        n = _check_rows(values, split)
        keys = [(s, m, k) for s in seeds for m in methods for k in metrics]
        x = np.stack([values[s][split][m][k] for s, m, k in keys], axis=1).astype(np.float64)  # (N, K)
        present = ~np.isnan(x)
        x = np.where(present, x, 0.0)
        draws = []
        for counts in resample_counts(n, resamples, seed):
            with np.errstate(invalid="ignore", divide="ignore"):
                draws.append((counts @ x) / (counts @ present))  # (b, K): each column's metric per resample
        boot = np.concatenate(draws)  # (resamples, K)
        with np.errstate(invalid="ignore", divide="ignore"):
            full = x.sum(0) / present.sum(0)  # (K,)
        col = {key: j for j, key in enumerate(keys)}
        for m in methods:
            for k in metrics:
                own = [col[(s, m, k)] for s in seeds]
                base = [col[(s, baseline, k)] for s in seeds]
                dist = boot[:, own].mean(1)
                diff = (boot[:, own] - boot[:, base]).mean(1)
                row = {
                    "method": m,
                    "split": split,
                    "metric": k,
                    "n_seeds": len(seeds),
                    "n_rows": int(present[:, own[0]].sum()),
                    "value": float(full[own].mean()),
                    "ci_low": float(np.nanquantile(dist, lo_q)),
                    "ci_high": float(np.nanquantile(dist, hi_q)),
                    "diff": float((full[own] - full[base]).mean()),
                    "diff_low": float(np.nanquantile(diff, lo_q)),
                    "diff_high": float(np.nanquantile(diff, hi_q)),
                }
                if is_accuracy(k) and m != baseline:
                    tests = [
                        mcnemar_exact(values[s][split][baseline][k], values[s][split][m][k]) for s in seeds
                    ]
                    row.update(
                        mcnemar_b=sum(t[0] for t in tests),
                        mcnemar_c=sum(t[1] for t in tests),
                        mcnemar_p=mcnemar_agreeing(tests),
                        mcnemar_p_each=" ".join(f"{t[2]:.4g}" for t in tests),
                        mcnemar_bc_each=" ".join(f"{t[0]}/{t[1]}" for t in tests),
                    )
                rows.append(row)
    out = pd.DataFrame(rows)
    for c in ("mcnemar_b", "mcnemar_c", "mcnemar_p", "mcnemar_p_each", "mcnemar_bc_each"):
        if c not in out.columns:
            out[c] = np.nan
    return out
