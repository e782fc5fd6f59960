"""Builders shared by the analysis tests: a tiny real model, checkpoints of fake epochs, a small EncodedData.

No tests here; the test_analysis_*.py modules import these helpers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from redheart_tune.config import Config, config_to_dict
from redheart_tune.data.dataset import EncodedData, split_fingerprint
from redheart_tune.data.vader import task_specs
from redheart_tune.engine.checkpoints import write_checkpoint
from redheart_tune.model.family import build_model
from redheart_tune.model.groups import GROUPS, MODULES, selection_units

INPUT_DIM = 16
TASKS = task_specs()


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(Config().model, TASKS, INPUT_DIM)


def epoch_state(base: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
    """The base weights perturbed by noise seeded with the epoch: every epoch's tensors differ."""
    g = torch.Generator().manual_seed(1000 + epoch)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}


def module_losses_for(epoch: int, targets: dict[str, int]) -> dict[str, float]:
    """Every module's fake val loss: a parabola with its minimum at its unit's target epoch."""
    out = {}
    for unit in selection_units():
        for i, m in enumerate(unit.modules):
            out[m] = 1.0 + 0.01 * (epoch - targets[unit.name]) ** 2 + 0.001 * i
    return out


def default_targets() -> dict[str, int]:
    """A distinct best epoch per unit, so a crossover mixes several checkpoints."""
    choices = [6, 10, 4, 2, 12, 8, 6, 4, 10, 2]
    return {u.name: choices[i % len(choices)] for i, u in enumerate(selection_units())}


def fake_metrics(epoch: int, targets: dict[str, int]) -> dict:
    """A checkpoint's metrics.json as redheart_tune/tune/trainable.py writes it (flat keys plus the nested detail)."""
    losses = module_losses_for(epoch, targets)
    train_loss = 1.2 - 0.05 * epoch
    val_loss = float(np.mean(list(losses.values())))
    flat = {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "train_acc": 0.5,
        "val_acc": 0.4,
        "grad_norm": 1.0,
        "peak_memory_mb": 100.0 + epoch,
        "memory_kind": "process_rss",
        "epoch_time_s": 0.1,
        "lr": 1e-3,
        "lr_peak": 1e-3,
        "score": val_loss,
        **{f"val_loss/{m}": v for m, v in losses.items()},
        **{f"val_acc/{m}": 0.5 for m in losses},
        **{f"val_group_loss/{g}": float(np.mean([losses[m] for m in ms])) for g, ms in GROUPS.items()},
    }
    return {
        **flat,
        "train": {"loss": train_loss, "accuracy": 0.5, "grad_norm": 1.0, "lrs": [1e-3]},
        "val": {
            "loss": val_loss,
            "accuracy": 0.4,
            "module_loss": losses,
            "module_metric": dict.fromkeys(losses, 0.5),
            "task_metric": {"emotion": 0.4},
        },
        "grad_stats": {
            f"{m}.w": {"mean": 0.0, "std": 1.0, "max": 1.0, "min": -1.0, "norm": float(i + epoch)}
            for i, m in enumerate(MODULES)
        },
        "weight_stats": {f"{m}.w": {"mean": 0.0, "std": 1.0, "norm": 1.0, "sparsity": 0.25} for m in MODULES},
        "activation_stats": {},
    }


def fake_meta(epoch: int, fingerprint: str = "f" * 64, config: dict | None = None) -> dict:
    return {
        "epoch": epoch,
        "config": config or config_to_dict(Config()),
        "seed": 0,
        "data_fingerprint": fingerprint,
        "tasks": {t: {"kind": s.kind, "labels": list(s.labels)} for t, s in TASKS.items()},
        "input_dim": INPUT_DIM,
        "loss_history": {"train": [], "val": []},
    }


def write_fake_checkpoint(directory: Path, base: dict[str, torch.Tensor], epoch: int, **meta_kw) -> Path:
    return write_checkpoint(
        directory,
        model_state=epoch_state(base, epoch),
        metrics=fake_metrics(epoch, default_targets()),
        meta=fake_meta(epoch, **meta_kw),
        resume_state=None,
    )


def write_fake_run(root: Path, epochs=(2, 4, 6, 8, 10, 12), **meta_kw) -> tuple[dict[int, Path], dict]:
    """Checkpoint folders of fake epochs (no Tune): {epoch: path} and the base state."""
    base = tiny_model().state_dict()
    dirs = {e: write_fake_checkpoint(root / f"epoch_{e:04d}", base, e, **meta_kw) for e in epochs}
    return dirs, base


def fake_data(n: int = 60, seed: int = 0) -> EncodedData:
    """A small EncodedData of random inputs and targets for the vader tasks: 30 train, 15 val, 15 test rows."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 6, size=n).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tokens = rng.standard_normal((int(lengths.sum()), INPUT_DIM)).astype(np.float16)
    emotion = rng.dirichlet(np.ones(3), size=n).astype(np.float32)
    targets = {
        "emotion": emotion,
        "bentham": rng.random((n, 3)).astype(np.float32),
        "regret": rng.random((n, 1)).astype(np.float32),
        "surd": rng.integers(0, 4, size=n).astype(np.int64),
    }
    masks = {t: np.ones(n, dtype=bool) for t in targets}
    ids = tuple(f"row{i}" for i in range(n))
    splits = {
        "train": np.arange(0, n // 2, dtype=np.int64),
        "val": np.arange(n // 2, 3 * n // 4, dtype=np.int64),
        "test": np.arange(3 * n // 4, n, dtype=np.int64),
    }
    params = {"source": "fake", "seed": seed}
    return EncodedData(
        tokens=tokens,
        token_start=starts,
        token_length=lengths,
        pooled=rng.standard_normal((n, INPUT_DIM)).astype(np.float32),
        targets=targets,
        target_mask=masks,
        ids=ids,
        texts=None,
        tasks=TASKS,
        splits=splits,
        split_params=params,
        fingerprint=split_fingerprint(ids, splits, params),
        encoder="fake==0",
        max_tokens=5,
    )


def fake_holdout(n: int = 24, seed: int = 7) -> EncodedData:
    """A second held-out set for ``fake_data``'s tasks and input width: its own rows and ids, one split "holdout"."""
    import dataclasses

    rows = fake_data(n, seed)
    ids = tuple(f"held{i}" for i in range(n))
    splits = {"holdout": np.arange(n, dtype=np.int64)}
    params = {"source": "fake-holdout", "seed": seed}
    return dataclasses.replace(
        rows, ids=ids, splits=splits, split_params=params, fingerprint=split_fingerprint(ids, splits, params)
    )
