"""Issue 19: space is checked before it runs out (tune.faults.SpaceCheck, tune.checkpoints.plan_space).

The free space comes through ``shutil.disk_usage``, which ``tune.faults.free_bytes`` (the one seam every
check reads) calls; here a fixture answers it per folder.  The end-to-end runs are in tests/test_faults.py.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from redheart_tune.engine.checkpoints import MANIFEST, measured_size
from redheart_tune.util import faults
from redheart_tune.util.faults import CheckpointSize, NoRoomError, SpaceCheck, out_of_space, space_line
from tests.test_checkpoints import write

GB = 10**9
# One checkpoint of the 730M model: 2.9 GB of weights + 5.8 GB of resume state.
BIG = CheckpointSize(2_900_000_000, 5_800_000_000, 8_700_000_000, "as measured at epoch 2")
EPOCHS = list(range(2, 21, 2))  # ten checkpoints to write


@pytest.fixture
def disk(monkeypatch):
    """``{folder: free bytes}``: what ``shutil.disk_usage`` reports for that folder and everything under it."""
    free: dict[Path, int] = {}
    real = shutil.disk_usage

    def usage(path):
        path = Path(path)
        for root, n in free.items():
            if path == root or root in path.parents:
                return SimpleNamespace(total=100 * GB, used=100 * GB - n, free=n)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return free


def folders(tmp_path):
    staging, trial = tmp_path / "tmp", tmp_path / "runs" / "trial"
    staging.mkdir()
    trial.mkdir(parents=True)
    return staging, trial


def test_staged_elsewhere_four_of_ten_fit_as_the_older_resume_states_are_pruned(tmp_path, disk, monkeypatch):
    """30 GB free in the trial's folder, the staging folder on another disk.  The 1st, 2nd and 3rd
    checkpoints leave 21.3, 12.6 and 3.9 GB; the third prunes the first's resume state (+5.8 GB: 9.7);
    the 4th leaves 1.0 + 5.8 = 6.8 GB, less than the 5th's 8.7 GB."""
    staging, trial = folders(tmp_path)
    monkeypatch.setattr(faults, "same_filesystem", lambda a, b: False)
    disk[staging], disk[trial] = 100 * GB, 30 * GB
    check = SpaceCheck(BIG, staging, trial, keep_resume=2)
    assert check.fitting(len(EPOCHS), held=0) == (4, trial, 30 * GB)
    assert check.start_line(EPOCHS, held=0) == (
        f"[space] only 4 of the 10 remaining checkpoints will fit in {trial}: 30.0 GB free there; "
        "one checkpoint of this model takes 2.9 GB of weights + 5.8 GB of resume state (as measured at "
        "epoch 2). Free space before epoch 10's checkpoint, or the run stops there."
    )
    # A resumed trial whose folder holds two resume states already: every write prunes one at once, so
    # each takes 2.9 GB net; 30, 27.1, ..., 9.7 GB before the first eight, 6.8 GB before the ninth.
    assert check.fitting(len(EPOCHS), held=2)[0] == 8


def test_staged_on_the_same_disk_a_checkpoint_needs_room_twice(tmp_path, disk):
    """The staged copy and Tune's copy exist at once: 17.4 GB needed for each write; 30 GB holds two."""
    staging, trial = folders(tmp_path)  # both on tmp_path's filesystem
    disk[tmp_path] = 30 * GB
    check = SpaceCheck(BIG, staging, trial, keep_resume=2)
    assert check.places() == [(trial, 2)]
    assert check.fitting(len(EPOCHS), held=0) == (2, trial, 30 * GB)
    assert "only 2 of the 10 remaining checkpoints" in check.start_line(EPOCHS, held=0)


def test_keeping_every_resume_state_three_fit(tmp_path, disk, monkeypatch):
    staging, trial = folders(tmp_path)
    monkeypatch.setattr(faults, "same_filesystem", lambda a, b: False)
    disk[staging], disk[trial] = 100 * GB, 30 * GB
    assert SpaceCheck(BIG, staging, trial, keep_resume=None).fitting(len(EPOCHS), held=0)[0] == 3


def test_all_fit_no_warning(tmp_path, disk):
    staging, trial = folders(tmp_path)
    disk[tmp_path] = 200 * GB
    check = SpaceCheck(BIG, staging, trial, keep_resume=2)
    assert check.start_line(EPOCHS, held=0) is None
    assert check.start_line([], held=0) is None  # a sweep trial writes no checkpoint
    check.before_write(2)  # fits: nothing raised


def test_remote_storage_checks_only_the_staging_folder(tmp_path, disk):
    """A bucket's free space is unknown: only the local staging folder is checked, for one checkpoint
    at a time (it is emptied after each upload)."""
    staging, _ = folders(tmp_path)
    disk[staging] = 9 * GB
    check = SpaceCheck(BIG, staging, None, keep_resume=2)
    assert check.places() == [(staging, 1)]
    assert check.start_line(EPOCHS, held=0) is None
    disk[staging] = 5 * GB
    assert check.start_line(EPOCHS, held=0).startswith(
        f"[space] only 0 of the 10 remaining checkpoints will fit in {staging}: 5.0 GB free there;"
    )
    with pytest.raises(NoRoomError, match=f"in {staging}: 5.0 GB free there, 8.7 GB needed;"):
        check.before_write(2)


def test_a_checkpoint_that_cannot_fit_is_a_full_disk_reported_in_one_line(tmp_path, disk):
    """before_write raises an ENOSPC that run_trial's handler treats as a full disk (out_of_space), whose
    line (space_line) says where, the free space there, what is needed and one checkpoint's size."""
    staging, trial = folders(tmp_path)
    disk[tmp_path] = 12 * GB
    check = SpaceCheck(BIG, staging, trial, keep_resume=2)
    with pytest.raises(NoRoomError) as caught:
        check.before_write(6)
    exc = caught.value
    assert exc.errno == errno.ENOSPC and out_of_space(exc) is exc
    assert space_line(exc, trial, (1, 2)) == (
        f"Not enough space for epoch 6's checkpoint in {trial}: 12.0 GB free there, 17.4 GB (the staged "
        f"copy from {staging} and Tune's, at once) needed; one checkpoint of this model takes 2.9 GB of "
        "weights + 5.8 GB of resume state (as measured at epoch 2)"
    )
    assert list(staging.iterdir()) == [] and list(trial.iterdir()) == []  # nothing written


def test_measured_size_is_what_the_checkpoint_wrote(tmp_path):
    """The manifest's record: every file but the manifest itself, the resume state's share apart."""
    d = write(tmp_path)
    size = measured_size(d)
    files = {p.name: p.stat().st_size for p in d.iterdir() if p.name != MANIFEST}
    assert size.total == sum(files.values())
    assert size.resume == files["resume_state.pt"]
    assert size.weights == sum(n for name, n in files.items() if name.endswith(".safetensors"))
    assert size.source == "as measured at epoch 2"
