"""Issue 19: a run survives a full disk and a torn Tune experiment state, and `resume` ends bit-identical.

Each test drives run.py as a user would (a subprocess each: its own Ray, shut down at exit) on the smoke
config, and compares the final weights with one uninterrupted run shared by the module.  The full disk
is a small tmpfs (root and mount needed) or, anywhere, a disk that ``shutil.disk_usage`` reports
(FAKE_DISK, read by the space check's one seam, ``util.faults.free_bytes``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from redheart_tune.engine.checkpoints import CheckpointError, load_model_state, verify_checkpoint
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
def small_disk(where: Path, options: str):
    """A tmpfs mounted with ``options`` ("size=30m") at ``where`` (root and mount needed: the test is
    skipped without them)."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def stopped_before_epoch_4(proc, exp: Path) -> tuple[Path, str]:
    """A training run that was told at its start that one checkpoint of three fits (its
    sizes estimated from the model), then stopped before epoch 4's checkpoint: no retry, no
    traceback, nothing of that checkpoint written, epoch 2's intact.  Its trial folder and error line."""
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "resumed train trial" not in out, "the trial was retried into the full disk"
    (trial,) = [d for d in exp.iterdir() if d.name.startswith("lr_")]
    (warning,) = [x[x.index("[space]") :] for x in out.splitlines() if "[space]" in x]
    assert warning.startswith(f"[space] only 1 of the 3 remaining checkpoints will fit in {trial}: "), warning
    assert warning.endswith(
        " free there; one checkpoint of this model takes 7.7 MB of weights + 15.4 MB of resume state "
        "(estimated from the model's parameters, +5%). Free space before epoch 4's checkpoint, "
        "or the run stops there."
    ), warning
    (line,) = [x for x in out.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: Not enough space for epoch 4's checkpoint in {trial}: "), line
    assert (
        " needed; one checkpoint of this model takes 7.8 MB of weights + 15.8 MB of resume state "
        "(as measured at epoch 2). Not retried. Free space, then continue with: "
        f"python run.py resume {exp}"
    ) in line, line
    assert "epoch   5/6" not in out  # stopped at once
    verify_checkpoint(trial / "checkpoint_000000")
    assert sorted(p.name for p in trial.glob("checkpoint_*")) == ["checkpoint_000000"]
    return trial, line


def mb_free(line: str) -> float:
    """The free space a line reports, in MB."""
    return float(re.search(r": (\d+\.\d) MB free there", line).group(1))


def test_a_full_disk_stops_before_the_checkpoint_that_cannot_fit_and_resume_finishes_bit_identical(
    tmp_path, data_cache, reference
):
    """Issue 19's sequence: the output root on a 30 MB tmpfs, where epoch 4's checkpoint would not fit.
    The trial says so at its start; before epoch 4's checkpoint it stops at once (no FailureConfig retry)
    with one line and no traceback, writing nothing; after the disk grows, `resume` ends with the weights
    of an uninterrupted run.  The checkpoint is staged on the machine's own disk, not the tmpfs."""
    with small_disk(tmp_path / "disk", "size=30m") as disk:
        exp = disk / "smoke" / "train"
        trial, line = stopped_before_epoch_4(_run(["train"], disk, data_cache), exp)
        assert mb_free(line) < 23.7
        assert ", 23.7 MB needed;" in line  # one copy there: the staged one is elsewhere

        subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)
        out = _finish(_run(["resume", str(exp)], disk, data_cache))
        assert "Traceback" not in out and "[space]" not in out, out[-3000:]
        assert "resumed train trial at epoch 3" in out
        assert_same_final_weights(reference, exp)


def test_a_disk_that_fills_in_the_middle_of_a_checkpoint_stops_in_one_line_and_resume_finishes_bit_identical(
    tmp_path, data_cache, reference
):
    """ENOSPC in the middle of a checkpoint's copy into the trial folder, which the space check cannot
    foresee: a tmpfs of 200 MB but 35 files (inodes), which run out in the middle of epoch 4's checkpoint.
    The run stops at once (no FailureConfig retry) with one line and no traceback; after the disk grows,
    `resume` moves the torn checkpoint aside and ends with the weights of an uninterrupted run."""
    with small_disk(tmp_path / "disk", "size=200m,nr_inodes=35") as disk:
        proc = _run(["train"], disk, data_cache)
        out, _ = proc.communicate(timeout=300)
        exp = disk / "smoke" / "train"
        assert proc.returncode == 2, out[-3000:]
        assert "Traceback" not in out and "[space]" not in out, out[-3000:]
        assert "resumed train trial" not in out, "the trial was retried into the full disk"
        (line,) = [x for x in out.splitlines() if x.startswith("error:")]
        (trial,) = [d for d in exp.iterdir() if d.name.startswith("lr_")]
        assert f"No space left on device (ENOSPC) writing {trial}: " in line
        assert (
            " MB free there but no free inodes (df -i); one checkpoint of this model takes 7.7 MB of weights "
            "+ 15.4 MB of resume state" in line
        )
        assert line.endswith(f"Free space, then continue with: python run.py resume {exp}")
        # What the fault left: epoch 2's checkpoint verifies; epoch 4's folder is torn.
        verify_checkpoint(trial / "checkpoint_000000")
        torn = trial / "checkpoint_000001"
        with pytest.raises(CheckpointError, match="missing|never completed"):
            verify_checkpoint(torn)

        subprocess.run(["mount", "-o", "remount,nr_inodes=1000", str(disk)], check=True)
        out = _finish(_run(["resume", str(exp)], disk, data_cache))
        assert "Traceback" not in out, out[-3000:]
        assert f"[resume] moved aside {torn} -> {trial / 'broken' / torn.name}: does not verify" in out
        assert "resumed train trial at epoch 3" in out
        assert_same_final_weights(reference, exp)
        assert (trial / "broken" / torn.name).is_dir()  # kept, not deleted


FAKE_DISK = '''\
"""A disk of $REDHEART_TEST_DISK_BYTES bytes holding the folder $REDHEART_TEST_DISK, as shutil.disk_usage
reports it: its used bytes are the files in that folder.  tests/test_faults.py puts this file on
PYTHONPATH, so run.py and every Ray worker it starts read it at their start."""
import collections
import os
import shutil

_root = os.path.realpath(os.environ["REDHEART_TEST_DISK"])
_capacity = int(os.environ["REDHEART_TEST_DISK_BYTES"])
_real = shutil.disk_usage
_usage = collections.namedtuple("usage", "total used free")


def _used():
    n = 0
    for folder, _, files in os.walk(_root):
        for name in files:
            try:
                n += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:  # removed while counted
                pass
    return n


def disk_usage(path):
    p = os.path.realpath(path)
    if p != _root and not p.startswith(_root + os.sep):
        return _real(path)
    used = _used()
    return _usage(_capacity, used, max(0, _capacity - used))


shutil.disk_usage = disk_usage
'''


def test_on_a_disk_seen_through_the_seam_a_run_stops_before_the_checkpoint_that_cannot_fit(
    tmp_path, data_cache, reference, monkeypatch
):
    """The same sequence without root: the output root and the staging folder (TMPDIR) on a 60 MB disk
    that ``shutil.disk_usage`` reports (FAKE_DISK; every check reads it through ``free_bytes``).  Epoch
    2's checkpoint needs 2 x 24.4 MB (estimated; staged and copied on the same disk), epoch 4's 2 x 23.7
    MB (measured) beside epoch 2's 23.7 MB: it does not fit.  With 200 MB, `resume` finishes."""
    disk, site = tmp_path / "disk", tmp_path / "site"
    (disk / "tmp").mkdir(parents=True)
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_DISK)
    ray_tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"  # Ray's own, as before
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("TMPDIR", str(disk / "tmp"))  # where tempfile stages a checkpoint
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("REDHEART_TEST_DISK", str(disk))
    monkeypatch.setenv("REDHEART_TEST_DISK_BYTES", str(60 * 10**6))

    exp = disk / "smoke" / "train"
    trial, line = stopped_before_epoch_4(_run(["train"], disk, data_cache), exp)
    assert f", 47.5 MB (the staged copy from {disk / 'tmp'} and Tune's, at once) needed;" in line
    assert 60 - 23.8 - 1 < mb_free(line) < 47.5  # epoch 2's checkpoint and Tune's records (< 1 MB) used
    assert list((disk / "tmp").glob("redheart-ckpt-*")) == []  # nothing staged left behind

    monkeypatch.setenv("REDHEART_TEST_DISK_BYTES", str(200 * 10**6))
    out = _finish(_run(["resume", str(exp)], disk, data_cache))
    assert "Traceback" not in out and "[space]" not in out, out[-3000:]
    assert "resumed train trial at epoch 3" in out
    assert_same_final_weights(reference, exp)


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
