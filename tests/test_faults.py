"""Issue 19: a run survives a full disk and a torn Tune experiment state, and `resume` ends bit-identical.

Both tests drive run.py as a user would (a subprocess each: its own Ray, shut down at exit) on the smoke
config, and compare the final weights with one uninterrupted run shared by the module.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from redheart_tune.engine.checkpoints import load_model_state, verify_checkpoint
from tests.test_train import _finish, _kill_group, _run, _wait_for_checkpoint, checkpoints_of

pytestmark = pytest.mark.slow  # real training runs, about a minute each


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache) -> Path:
    """An uninterrupted smoke training run: its experiment directory."""
    root = tmp_path_factory.mktemp("reference")
    _finish(_run(["train"], root, data_cache))
    return root / "smoke" / "train"


def assert_same_final_weights(reference: Path, experiment: Path) -> None:
    ref, cut = checkpoints_of(reference), checkpoints_of(experiment)
    assert sorted(ref) == sorted(cut) == [2, 4, 6]
    a, b = load_model_state(ref[6]), load_model_state(cut[6])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@contextlib.contextmanager
def small_disk(where: Path, size: str):
    """A tmpfs of ``size`` at ``where`` (root and mount needed: the test is skipped without them)."""
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_stops_at_once_in_one_line_and_resume_finishes_bit_identical(
    tmp_path, data_cache, reference
):
    """Issue 19's sequence: the output root on a 30 MB tmpfs, where epoch 4's checkpoint runs out of space.
    The run stops at once (no FailureConfig retry) with one line and no traceback; after the disk grows,
    `resume` moves the torn checkpoint aside and ends with the weights of an uninterrupted run."""
    with small_disk(tmp_path / "disk", "30m") as disk:
        proc = _run(["train"], disk, data_cache)
        out, _ = proc.communicate(timeout=300)
        exp = disk / "smoke" / "train"
        assert proc.returncode == 2, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        assert "resumed train trial" not in out, "the trial was retried into the full disk"
        (line,) = [x for x in out.splitlines() if x.startswith("error:")]
        (trial,) = [d for d in exp.iterdir() if d.name.startswith("lr_")]
        assert f"No space left on device (ENOSPC) writing {trial}: " in line
        assert (
            " free there; one checkpoint of this model takes 7.7 MB of weights + 15.4 MB of resume state"
            in line
        )
        assert line.endswith(f"Free space, then continue with: python run.py resume {exp}")
        # What the fault left: epoch 2's checkpoint verifies; epoch 4's folder is torn.
        verify_checkpoint(trial / "checkpoint_000000")
        assert sorted(checkpoints_of(exp)) == [2, 4]  # a manifest, but not the files it lists
        torn = trial / "checkpoint_000001"
        with pytest.raises(Exception, match="truncated|missing"):
            verify_checkpoint(torn)

        subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)
        out = _finish(_run(["resume", str(exp)], disk, data_cache))
        assert "Traceback" not in out, out[-3000:]
        assert (
            f"[resume] moved aside {torn} -> {trial / 'broken' / 'checkpoint_000001'}: does not verify" in out
        )
        assert "resumed train trial at epoch 3" in out
        assert_same_final_weights(reference, exp)
        assert (trial / "broken" / "checkpoint_000001" / "manifest.json").is_file()  # kept, not deleted


def test_a_torn_tune_state_and_a_truncated_checkpoint_resume_from_the_newest_that_verifies(
    tmp_path, data_cache, reference
):
    """The driver dies after epoch 4's checkpoint; then Tune's experiment state is torn, its searcher state
    emptied and epoch 4's weights truncated.  `resume` says so, moves the checkpoint aside, continues
    from epoch 2's with a fresh Tuner, and ends with the weights and history of an uninterrupted run."""
    from redheart_tune.analysis import load_training_run

    proc = _run(["train"], tmp_path, data_cache)
    exp = tmp_path / "smoke" / "train"
    _wait_for_checkpoint(proc, exp, 4)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _kill_group(proc.pid)
    assert 6 not in checkpoints_of(exp), "the run finished before it was killed; the test proves nothing"

    (state,) = exp.glob("experiment_state-*.json")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    (searcher,) = exp.glob("basic-variant-state-*.json")
    searcher.write_bytes(b"")
    bad = checkpoints_of(exp)[4]
    weights = bad / "independent.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])

    out = _finish(_run(["resume", str(exp)], tmp_path, data_cache))
    assert "Traceback" not in out, out[-3000:]
    trial = bad.parent
    assert f"[resume] moved aside {bad} -> {trial / 'broken' / bad.name}: does not verify" in out
    (line,) = [x for x in out.splitlines() if "is unreadable" in x]
    assert line.startswith(f"[resume] Tune's experiment state {state.name} is unreadable (JSONDecodeError")
    assert f"continuing the trial from {trial / 'checkpoint_000000'} (epoch 2) with a fresh Tuner" in line
    assert "resumed train trial at epoch 3" in out

    assert_same_final_weights(reference, exp)
    assert (exp / "broken" / state.name).is_file() and not state.exists()  # Tune's torn state, kept aside
    assert (exp / "broken" / searcher.name).is_file() and (trial / "broken" / bad.name).is_dir()
    # One trial folder, its history whole: every epoch once, each as the uninterrupted run had it.
    run, ref = load_training_run(exp), load_training_run(reference)
    assert run.trial_path == trial and run.status == "TERMINATED"
    assert list(run.epochs["epoch"]) == [1, 2, 3, 4, 5, 6]
    assert run.epochs["val_loss"].tolist() == ref.epochs["val_loss"].tolist()
    assert sorted(run.complete) == [2, 4, 6]
    assert json.loads((exp / "session_info_final.json").read_text())["checkpoints"] == [
        "checkpoint_000000",
        "checkpoint_000001",
        "checkpoint_000002",
    ]
    status = _finish(_run(["status"], tmp_path, data_cache), timeout=120)
    assert f"moved aside (does not verify, or replaced): {trial / 'broken' / bad.name}" in status
