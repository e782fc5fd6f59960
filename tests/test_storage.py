"""redheart_tune/tune/storage.py's mirror of a remote root, with a second local directory standing in for the bucket."""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from redheart_tune.tune.storage import Storage


def test_pull_fetches_a_record_rewritten_at_the_same_size_and_skips_what_it_has(tmp_path):
    bucket, mirror = tmp_path / "bucket", tmp_path / "mirror"
    record = bucket / "run" / "train" / "trial" / "live_progress.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"step": 11}')
    st = Storage(uri=str(bucket), local=mirror, fs=pafs.LocalFileSystem(), fs_root=str(bucket))
    assert st.remote
    st.pull("run/train", weights=False)
    copy = mirror / "run" / "train" / "trial" / "live_progress.json"
    assert copy.read_text() == '{"step": 11}'

    # A copy that is the stored file is kept, not downloaded again (a download replaces the file) ...
    assert copy.stat().st_mtime_ns == record.stat().st_mtime_ns
    inode = copy.stat().st_ino
    st.pull("run/train", weights=False)
    assert copy.stat().st_ino == inode
    # ... but the same record rewritten at the same size is (a size-only check kept the stale copy).
    later = record.stat().st_mtime_ns + 2_000_000_000
    record.write_text('{"step": 12}')
    os.utime(record, ns=(later, later))
    st.pull("run/train", weights=False)
    assert copy.read_text() == '{"step": 12}'
