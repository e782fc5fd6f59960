"""Checkpoint layout: per-group safetensors, manifest verification, resume-state pruning, RNG capture."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from model.groups import GROUPS
from tune.checkpoints import (
    CheckpointError,
    capture_rng,
    drop_resume_state,
    load_group,
    load_model_state,
    load_resume_state,
    restore_rng,
    split_state_by_group,
    verify_checkpoint,
    write_checkpoint,
)


def fake_state() -> dict[str, torch.Tensor]:
    """One tensor under every declared module's prefix (the real model is tested in test_model/test_train)."""
    g = torch.Generator().manual_seed(0)
    return {f"{m}.weight": torch.randn(3, 2, generator=g) for members in GROUPS.values() for m in members}


def write(tmp_path, resume=True):
    return write_checkpoint(
        tmp_path / "epoch_0002",
        model_state=fake_state(),
        metrics={"epoch": 2, "val_loss": 1.0},
        meta={"epoch": 2},
        resume_state={"epoch": 2, "rng": capture_rng()} if resume else None,
    )


def test_round_trip_per_group(tmp_path):
    d = write(tmp_path)
    info = verify_checkpoint(d)
    assert info.epoch == 2 and info.has_resume_state
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [f"{g}.safetensors" for g in GROUPS]
        + ["metrics.json", "meta.json", "manifest.json", "resume_state.pt"]
    )
    state = fake_state()
    for group, members in GROUPS.items():
        tensors = load_group(d, group)
        assert set(tensors) == {f"{m}.weight" for m in members}
        for k, v in tensors.items():
            assert torch.equal(v, state[k])
    assert set(load_model_state(d)) == set(state)


def test_split_rejects_undeclared_keys():
    with pytest.raises(KeyError, match="belongs to no declared module"):
        split_state_by_group({"mystery.weight": torch.zeros(1)})


def test_truncated_group_file_is_named(tmp_path):
    d = write(tmp_path)
    f = d / "group_b.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="group_b.safetensors.*truncated"):
        verify_checkpoint(d)


def test_corrupt_file_same_size_is_caught_by_hash(tmp_path):
    d = write(tmp_path)
    f = d / "independent.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(d)


def test_missing_manifest_means_incomplete(tmp_path):
    d = write(tmp_path)
    (d / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="never completed"):
        verify_checkpoint(d)


def test_drop_resume_state_keeps_checkpoint_valid(tmp_path):
    import pyarrow.fs as pafs

    d = write(tmp_path)
    drop_resume_state(pafs.LocalFileSystem(), d)
    info = verify_checkpoint(d)
    assert not info.has_resume_state and not (d / "resume_state.pt").exists()
    assert "resume_state.pt" not in json.loads((d / "manifest.json").read_text())["files"]
    with pytest.raises(CheckpointError, match="keeps no resume state"):
        load_resume_state(d)


def test_rng_capture_restores_every_generator(tmp_path):
    d = write(tmp_path)
    rs = load_resume_state(d)  # through torch.load(weights_only=True)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(rs["rng"])
    # The state was captured before ``expected`` was drawn, so the same numbers come again.
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
