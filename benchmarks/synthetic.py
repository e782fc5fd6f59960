"""Encoder-shaped synthetic data for the benchmarks: the Red Heart tasks, random token sequences.

The benchmarks measure speed and memory, which depend on shapes, not on what the
sentences say, and the GPU machine has no sentence encoder.  Rows follow the
``EncodedData`` contract exactly (right-padded lengths, a pooled vector, targets
that follow the TaskSpecs), so the real batching and training code runs on them.
"""

from __future__ import annotations

import numpy as np

from redheart_tune.data import EncodedData, task_specs

TASKS = task_specs("redheart")
"""The user's data format's tasks: 7-way emotion distribution, 4 Bentham scores, regret, 4 SURD metrics."""


def synthetic_data(
    rows: int, tokens: int, input_dim: int = 384, *, seed: int = 0, val_rows: int = 0
) -> EncodedData:
    """``rows`` training rows (and ``val_rows`` validation rows) of up to ``tokens`` tokens each."""
    rng = np.random.default_rng(seed)
    n = rows + val_rows
    lengths = rng.integers(max(1, tokens // 4), tokens + 1, size=n)
    lengths[0] = tokens
    flat = rng.standard_normal((int(lengths.sum()), input_dim)).astype(np.float16)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    pooled = np.stack(
        [flat[s : s + k].astype(np.float32).mean(0) for s, k in zip(starts, lengths, strict=True)]
    )
    emotion = rng.random((n, 7)).astype(np.float32)
    targets = {
        "emotion": emotion / emotion.sum(1, keepdims=True),
        "bentham": rng.random((n, 4)).astype(np.float32),
        "regret": rng.random((n, 1)).astype(np.float32),
        "surd": rng.random((n, 4)).astype(np.float32),
    }
    splits = {"train": np.arange(rows, dtype=np.int64)}
    if val_rows:
        splits["val"] = np.arange(rows, n, dtype=np.int64)
    return EncodedData(
        tokens=flat,
        token_start=starts,
        token_length=lengths.astype(np.int64),
        pooled=pooled,
        targets=targets,
        target_mask={t: np.ones(n, dtype=bool) for t in TASKS},
        ids=tuple(f"synthetic-{i}" for i in range(n)),
        texts=None,
        tasks=TASKS,
        splits=splits,
        split_params={"source": "synthetic", "seed": seed, "rows": n, "tokens": tokens},
        fingerprint=f"synthetic-{seed}-{n}-{tokens}-{input_dim}",
        encoder="synthetic",
        max_tokens=tokens,
    )
