"""redheart_tune/util/files.py: the one atomic writer and the one sha256 helper the code base uses."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from redheart_tune.util.files import sha256_file, write_atomic, write_json_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out" / "best_lr.json"
    write_json_atomic(path, {"best_lr": 1e-4, "score": float("nan")})
    assert json.loads(path.read_text())["best_lr"] == 1e-4

    def half_then_crash(tmp):
        tmp.write_text('{"best_lr": 5e')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_crash)
    assert json.loads(path.read_text())["best_lr"] == 1e-4
    assert [p.name for p in path.parent.iterdir()] == ["best_lr.json"]


def test_sha256_file_reads_in_blocks(tmp_path):
    data = bytes(range(256)) * 10_000  # 2.5 MB: several 1 MiB blocks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_an_atomic_write_gets_the_permissions_a_plain_write_would(tmp_path):
    old = os.umask(0o022)
    try:
        atomic = write_json_atomic(tmp_path / "results.json", {"a": 1})
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
    finally:
        os.umask(old)
    # mkstemp's 0600 made every result, manifest and config unreadable to the rest of a research group.
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644
