"""Phase 2 for real: the tiny model trained through Tune, its checkpoints, and an exact resume after SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.groups import GROUPS, MODULES
from tune.checkpoints import load_model_state, verify_checkpoint

REPO = Path(__file__).resolve().parent.parent


def checkpoints_of(experiment: Path) -> dict[int, Path]:
    """Epoch -> checkpoint directory of the (single) trial of a training experiment."""
    out = {}
    for d in experiment.glob("*/checkpoint_*"):
        if (d / "manifest.json").is_file():
            out[json.loads((d / "meta.json").read_text())["epoch"]] = d
    return out


def test_six_epochs_through_tune_leave_checkpoints_2_4_6(smoke_cfg, ray_session):
    from tune.config import cache_dir
    from tune.data import prepare_data
    from tune.runner import experiment_dir
    from tune.train import run_train

    cfg = smoke_cfg()
    prepare_data(cfg.data, cache_dir(cfg), show_progress=False)
    results = run_train(cfg)
    exp = experiment_dir(cfg, "train")

    ckpts = checkpoints_of(exp)
    assert sorted(ckpts) == [2, 4, 6]
    for epoch, d in ckpts.items():
        info = verify_checkpoint(d)
        assert info.epoch == epoch
        assert {f"{g}.safetensors" for g in GROUPS} <= {p.name for p in d.iterdir()}
        val = info.metrics["val"]
        assert set(val["module_loss"]) == set(MODULES)  # a real per-module val loss for every module
        assert all(v > 0 and v == v for v in val["module_loss"].values())
        assert (
            info.metrics["grad_stats"] and info.metrics["weight_stats"] and info.metrics["activation_stats"]
        )
        assert info.meta["data_fingerprint"] and info.meta["config"]["run"]["seed"] == 0
        # Only the newest checkpoint keeps the resume state (train.keep_resume_state: latest).
        assert info.has_resume_state == (epoch == 6)

    # The LR log across checkpoints shows the warm-up and at least one warm restart.
    lrs = [
        row["lr"]
        for e in sorted(ckpts)
        for row in json.loads((ckpts[e] / "metrics.json").read_text())["lr_log"]
    ]
    warm = [i for i in range(1, len(lrs)) if lrs[i] > lrs[i - 1]]
    assert lrs[0] < lrs[1], "warm-up rises"
    restarts = [i for i in warm if lrs[i] - lrs[i - 1] > 0.5 * max(lrs)]
    assert restarts, f"no warm restart in {lrs}"

    df = results[0].metrics_dataframe
    assert list(df["epoch"]) == [1, 2, 3, 4, 5, 6]
    assert (exp / "session_info.json").is_file() and (exp / "session_info_final.json").is_file()
    split = json.loads((exp / "split.json").read_text())  # the split, every record id, recorded with the run
    assert split["fingerprint"] == info.meta["data_fingerprint"]
    assert sum(len(v) for v in split["ids"].values()) == cfg.data.max_samples


def _ray_processes() -> set[int]:
    """Ray processes outside this test process's own session (so the session-wide Ray fixture's workers,
    which may come and go, never count as leftovers of a driver the test started)."""
    out = subprocess.run(["pgrep", "-f", "ray::|raylet|gcs_server"], capture_output=True, text=True).stdout
    own = os.getsid(0)
    pids = set()
    for p in map(int, out.split()):
        try:
            if os.getsid(p) != own:
                pids.add(p)
        except ProcessLookupError:
            pass  # ended between pgrep and here
    return pids


def _run(args, root: Path, cache: Path, **kw):
    cmd = [sys.executable, str(REPO / "run.py"), *args]
    if args[0] != "resume":
        cmd += [str(REPO / "configs" / "smoke.yaml"), f"run.output_root={root}", f"data.cache_dir={cache}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def _finish(proc, timeout=600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_sigkill_then_resume_is_bit_identical(tmp_path, data_cache):
    """Kill the driver after the second checkpoint, resume, and compare with an uninterrupted run."""
    before = _ray_processes()
    ref_root, cut_root = tmp_path / "ref", tmp_path / "cut"
    _finish(_run(["train"], ref_root, data_cache))

    proc = _run(["train"], cut_root, data_cache)
    exp = cut_root / "smoke-train"
    _wait_for_checkpoint(proc, exp, 4)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only, as a crash would
    proc.wait()
    # Ray's head processes share the driver's fate; its two idle node agents may not, so clear what is
    # left of the dead driver's process group before going on (README: "After a crash").
    _kill_group(proc.pid)
    assert 6 not in checkpoints_of(exp), "the run finished before it was killed; the test proves nothing"

    # A plain `train` refuses to start over and says how to resume.
    out, _ = _run(["train"], cut_root, data_cache).communicate(timeout=300)
    assert "python run.py resume" in out

    _finish(_run(["resume", str(exp)], cut_root, data_cache))

    ref, cut = checkpoints_of(ref_root / "smoke-train"), checkpoints_of(exp)
    assert sorted(ref) == sorted(cut) == [2, 4, 6]
    a, b = load_model_state(ref[6]), load_model_state(cut[6])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    from analysis import load_training_run

    df = load_training_run(exp).epochs
    assert list(df["epoch"]) == [1, 2, 3, 4, 5, 6]  # no duplicated epochs after the resume
    ref_df = load_training_run(ref_root / "smoke-train").epochs
    assert df["val_loss"].tolist() == ref_df["val_loss"].tolist()
    assert not (_ray_processes() - before)


def test_ctrl_c_leaves_no_ray_process_behind(tmp_path, data_cache):
    """SIGINT to the foreground process group, as a terminal's Ctrl-C sends it."""
    before = _ray_processes()
    proc = _run(["train"], tmp_path, data_cache)
    exp = tmp_path / "smoke-train"
    _wait_for_checkpoint(proc, exp, 2)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    deadline = time.time() + 30
    while time.time() < deadline and _ray_processes() - before:
        time.sleep(0.5)
    assert not (_ray_processes() - before), out[-2000:]
    assert 2 in checkpoints_of(exp)  # what was written stays


def _wait_for_checkpoint(proc, experiment: Path, epoch: int) -> None:
    """Poll until the running driver ``proc`` has written the checkpoint of ``epoch``."""
    deadline = time.time() + 300
    while time.time() < deadline and epoch not in checkpoints_of(experiment):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    assert epoch in checkpoints_of(experiment), f"checkpoint of epoch {epoch} never appeared"


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    time.sleep(1)


@pytest.mark.parametrize("bad_lr", [1e6])
def test_nan_loss_stops_with_a_named_error_and_keeps_checkpoints(smoke_cfg, ray_session, bad_lr):
    from tune.config import cache_dir
    from tune.data import prepare_data
    from tune.runner import ExperimentError, experiment_dir
    from tune.train import run_train

    cfg = smoke_cfg(f"optim.lr={bad_lr}", "optim.grad_clip=0", "optim.warmup_ratio=0", "train.epochs=6")
    prepare_data(cfg.data, cache_dir(cfg), show_progress=False)
    with pytest.raises(ExperimentError) as err:
        run_train(cfg, lr_from_command_line=True)
    msg = str(err.value)
    assert "NonFiniteLossError" in msg and "python run.py resume" in msg
    error_txt = "".join(p.read_text() for p in experiment_dir(cfg, "train").glob("*/error.txt"))
    assert "non-finite" in error_txt and "epoch" in error_txt and "module" in error_txt
    for d in checkpoints_of(experiment_dir(cfg, "train")).values():
        verify_checkpoint(d)  # whatever was written before the failure is intact
