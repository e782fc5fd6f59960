"""Checkpoint layout: per-group safetensors, manifest verification, resume-state pruning, RNG capture."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from redheart_tune.engine.checkpoints import (
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
from redheart_tune.model.groups import GROUPS


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


def test_every_file_is_hashed_while_written_and_the_hashes_hold(tmp_path, monkeypatch):
    """The manifest's sha256s come from the bytes as they were written (no read-back pass: sha256_file
    is never called while writing), and they are the files' real hashes."""
    import redheart_tune.engine.checkpoints as ck
    from redheart_tune.util.files import sha256_file

    def no_read_back(path):
        raise AssertionError(f"{path} was read back to be hashed")

    monkeypatch.setattr(ck, "sha256_file", no_read_back)
    d = write(tmp_path)
    monkeypatch.undo()
    manifest = json.loads((d / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in d.iterdir()} - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry == {"bytes": (d / name).stat().st_size, "sha256": sha256_file(d / name)}, name
    verify_checkpoint(d)  # and verification, which does read the files, agrees


def test_write_timing_is_recorded_and_logged(tmp_path, caplog):
    import pyarrow.fs as pafs

    from redheart_tune.engine.checkpoints import write_timing

    with caplog.at_level("WARNING", logger="redheart_tune.engine.checkpoints"):
        d = write(tmp_path)
    t = write_timing(d)
    files = json.loads((d / "manifest.json").read_text())["files"]
    assert t["bytes"] == sum(e["bytes"] for e in files.values())
    assert t["weights_bytes"] == sum(files[f"{g}.safetensors"]["bytes"] for g in GROUPS)
    assert t["resume_state_bytes"] == files["resume_state.pt"]["bytes"]
    assert t["write_s"] >= 0 and t["hash_s"] >= 0
    assert any(
        r.getMessage().startswith("checkpoint 2: wrote ") and " hashed in " in r.getMessage()
        for r in caplog.records
    )
    drop_resume_state(pafs.LocalFileSystem(), d)
    verify_checkpoint(d)
    assert write_timing(d) == t  # the record stays when the resume state goes


def test_safetensors_written_tensor_by_tensor_load_with_safetensors(tmp_path):
    """Every dtype a state dict holds, 0-d and empty tensors: safetensors' own readers give them back."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from redheart_tune.engine.checkpoints import write_hashed, write_safetensors

    g = torch.Generator().manual_seed(1)
    tensors = {
        "w.f32": torch.randn(5, 3, generator=g),
        "w.bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(2, 3, generator=g).to(torch.float16),
        "w.f64": torch.randn(3, generator=g).double(),
        "n.i64": torch.tensor(12345678901),
        "n.i32": torch.arange(5, dtype=torch.int32),
        "m.bool": torch.tensor([True, False, True]),
        "m.u8": torch.arange(3, dtype=torch.uint8),
        "e.empty": torch.empty(0, 4),
    }
    path = tmp_path / "t.safetensors"
    entry, _ = write_hashed(path, lambda f: write_safetensors(f, tensors, {"group": "x"}))
    assert entry["bytes"] == path.stat().st_size
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"group": "x"}
