"""Phase 2 for real: the tiny model trained through Tune, its checkpoints, and an exact resume after SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from redheart_tune.engine.checkpoints import load_model_state, verify_checkpoint
from redheart_tune.model.groups import GROUPS, MODULES
from redheart_tune.tune.runner import ExperimentError
from redheart_tune.tune.train import with_lr

REPO = Path(__file__).resolve().parent.parent


def checkpoints_of(experiment: Path) -> dict[int, Path]:
    """Epoch -> checkpoint directory of the (single) trial of a training experiment: those whose files
    all match their manifest's sizes.  Tune copies a checkpoint into the experiment folder file by file, in no
    set order, so while a run is going the manifest can be there before meta.json is whole."""
    from redheart_tune.engine.checkpoints import CheckpointError, verify_checkpoint

    out = {}
    for d in experiment.glob("*/checkpoint_*"):
        try:
            verify_checkpoint(d, hashes=False)
        except CheckpointError:
            continue
        out[json.loads((d / "meta.json").read_text())["epoch"]] = d
    return out


def test_six_epochs_through_tune_leave_checkpoints_2_4_6(smoke_cfg, ray_session):
    from redheart_tune.config import cache_dir
    from redheart_tune.data import prepare_data
    from redheart_tune.layout import experiment_dir
    from redheart_tune.tune.train import run_train

    cfg = smoke_cfg()
    prepare_data(cfg.data, cache_dir(cfg), show_progress=False)
    results = run_train(cfg)
    exp = experiment_dir(cfg, "train")
    assert exp == Path(cfg.run.output_root) / "smoke" / "train"

    ckpts = checkpoints_of(exp)
    assert sorted(ckpts) == [2, 4, 6]
    for epoch, d in ckpts.items():
        info = verify_checkpoint(d)
        assert info.epoch == epoch
        assert {f"{g}.safetensors" for g in GROUPS} <= {p.name for p in d.iterdir()}
        val = info.metrics["val"]
        assert set(val["module_loss"]) == set(MODULES)  # a real per-module val loss for every module
        assert all(v > 0 and v == v for v in val["module_loss"].values())
        assert info.metrics["grad_stats"] and info.metrics["weight_stats"]
        assert set(info.metrics["activation_stats"]) == set(MODULES)  # group B's analyzers too
        # each module's metric under the name of what it is (smoke: VADER, surd a classification)
        assert {"val_acc/heads.emotion", "val_mae/heads.bentham", "val_fused_acc/surd"} <= set(info.metrics)
        assert not any(k.startswith("val_metric/") for k in info.metrics)
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
    # what the trial's start cost, reported with its first epoch only
    assert df["startup_s"].iloc[0] > 0 and df["startup_s"].iloc[1:].isna().all()
    assert (exp / "session_info.json").is_file() and (exp / "session_info_final.json").is_file()
    split = json.loads((exp / "split.json").read_text())  # the split, every record id, recorded with the run
    assert split["fingerprint"] == info.meta["data_fingerprint"]
    assert sum(len(v) for v in split["ids"].values()) == cfg.data.max_samples

    # Reusing the finished run: settings that do not change results are fine; a longer run, whose warm-up
    # and cycles would differ, is refused with the field and both values, and nothing is trained.
    again = run_train(smoke_cfg("resources.cpus_per_trial=2", f"data.cache_dir={exp.parent / 'elsewhere'}"))
    assert list(again[0].metrics_dataframe["epoch"]) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ExperimentError, match=r"train\.epochs: 6 stored, 8 now"):
        run_train(smoke_cfg("train.epochs=8"))
    with pytest.raises(ExperimentError, match=r"optim\.lr: 0\.001 stored, 0\.002 now"):
        run_train(with_lr(cfg, 2e-3))
    assert sorted(checkpoints_of(exp)) == [2, 4, 6]


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
    exp = cut_root / "smoke" / "train"
    _wait_for_checkpoint(proc, exp, 4)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only, as a crash would
    proc.wait()
    # Ray's head processes share the driver's fate; its two idle node agents may not, so clear what is
    # left of the dead driver's process group before going on (docs/limits.md).
    _kill_group(proc.pid)
    assert 6 not in checkpoints_of(exp), "the run finished before it was killed; the test proves nothing"

    # A plain `train` refuses to start over and says how to resume; so does `status`.
    out, _ = _run(["train"], cut_root, data_cache).communicate(timeout=300)
    assert "python run.py resume" in out
    status = _finish(_run(["status"], cut_root, data_cache), timeout=120)
    # The driver died soon after checkpoint 4; Tune's record may not have the epoch it was reporting.
    assert re.search(r"epoch [345]/6 \(\d+ %\)", status), status
    assert f"[status] next: python run.py resume {exp}" in status

    _finish(_run(["resume", str(exp)], cut_root, data_cache))

    ref, cut = checkpoints_of(ref_root / "smoke" / "train"), checkpoints_of(exp)
    assert sorted(ref) == sorted(cut) == [2, 4, 6]
    a, b = load_model_state(ref[6]), load_model_state(cut[6])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    from redheart_tune.analysis import load_training_run

    df = load_training_run(exp).epochs
    assert list(df["epoch"]) == [1, 2, 3, 4, 5, 6]  # no duplicated epochs after the resume
    ref_df = load_training_run(ref_root / "smoke" / "train").epochs
    assert df["val_loss"].tolist() == ref_df["val_loss"].tolist()
    deadline = time.time() + 30  # the last driver's Ray processes take a moment to go
    while time.time() < deadline and _ray_processes() - before:
        time.sleep(0.5)
    assert not (_ray_processes() - before)


@pytest.mark.slow
def test_a_killed_trial_worker_is_retried_from_its_checkpoint_bit_identically(tmp_path, data_cache):
    """SIGKILL the trial's worker process (as a dying node would take it) after the second checkpoint:
    the run finishes by itself (resources.max_failures) from that checkpoint, with the weights of an
    uninterrupted run."""
    ref_root, cut_root = tmp_path / "ref", tmp_path / "cut"
    _finish(_run(["train"], ref_root, data_cache))
    proc = _run(["train"], cut_root, data_cache)
    exp = cut_root / "smoke" / "train"
    _wait_for_checkpoint(proc, exp, 4)
    workers = [p for p in _ray_processes() if os.getsid(p) == proc.pid and "ImplicitFunc" in _cmdline(p)]
    assert len(workers) == 1, [(p, _cmdline(p)) for p in workers]
    os.kill(workers[0], signal.SIGKILL)
    assert 6 not in checkpoints_of(exp), "the trial finished before it was killed; the test proves nothing"
    out = _finish(proc)
    # Restarted from a checkpoint, not from scratch. Usually checkpoint 4; checkpoint 2 when the kill came
    # after the worker had written checkpoint 4 but before the driver had taken its report (Tune restores
    # the newest checkpoint the driver knows). Either way the end must be bit-identical.
    resumed = re.findall(r"resumed train trial at epoch (\d+)", out)
    assert resumed in (["5"], ["3"]), (resumed, out[-3000:])
    ref, cut = checkpoints_of(ref_root / "smoke" / "train"), checkpoints_of(exp)
    assert sorted(ref) == sorted(cut) == [2, 4, 6]
    a, b = load_model_state(ref[6]), load_model_state(cut[6])
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


def test_ctrl_c_leaves_no_ray_process_behind(tmp_path, data_cache):
    """SIGINT to the foreground process group, as a terminal's Ctrl-C sends it."""
    before = _ray_processes()
    proc = _run(["train"], tmp_path, data_cache)
    exp = tmp_path / "smoke" / "train"
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
    from redheart_tune.config import cache_dir
    from redheart_tune.data import prepare_data
    from redheart_tune.layout import experiment_dir
    from redheart_tune.tune.train import run_train

    cfg = smoke_cfg(f"optim.lr={bad_lr}", "optim.grad_clip=0", "optim.warmup_ratio=0", "train.epochs=6")
    prepare_data(cfg.data, cache_dir(cfg), show_progress=False)
    with pytest.raises(ExperimentError) as err:
        run_train(cfg, "command line (optim.lr)")
    msg = str(err.value)
    assert "NonFiniteLossError" in msg and "python run.py resume" in msg
    error_txt = "".join(p.read_text() for p in experiment_dir(cfg, "train").glob("*/error.txt"))
    assert "non-finite" in error_txt and "epoch" in error_txt and "module" in error_txt
    for d in checkpoints_of(experiment_dir(cfg, "train")).values():
        verify_checkpoint(d)  # whatever was written before the failure is intact


def test_resume_takes_a_lower_lr_after_a_nan_and_records_it(smoke_cfg, ray_session):
    """The NaN advice can be followed: resume with optim.lr=<lower> finishes the run from its newest
    checkpoint at the new LR, and the experiment's history says so; a change that alters the run is refused."""
    from redheart_tune.config import cache_dir
    from redheart_tune.data import prepare_data
    from redheart_tune.layout import CONFIG_FILE, experiment_dir
    from redheart_tune.pipeline.stages import resume_stage
    from redheart_tune.tune.train import run_train

    cfg = smoke_cfg("optim.lr=1e6", "optim.grad_clip=0", "optim.warmup_ratio=0", "train.epochs=4")
    prepare_data(cfg.data, cache_dir(cfg), show_progress=False)
    with pytest.raises(ExperimentError, match="optim.lr=<lower>"):
        run_train(cfg, "command line (optim.lr)")
    path = experiment_dir(cfg, "train")
    with pytest.raises(ExperimentError, match=r"a resume cannot change train.epochs: 4 stored, 8 asked"):
        resume_stage(path, ["optim.lr=1e-3", "train.epochs=8"])
    resume_stage(path, ["optim.lr=1e-3", "optim.grad_clip=1.0", "memory.strategy=stream"])
    record = json.loads((path / CONFIG_FILE).read_text())
    assert record["config"]["optim"]["lr"] == 1e-3 and record["config"]["optim"]["grad_clip"] == 1.0
    (change,) = record["history"]
    assert change["changed"]["optim.lr"] == [1e6, 1e-3] and change["from_epoch"] == 1
    assert change["changed"]["memory.strategy"] == ["auto", "stream"]
    done = checkpoints_of(path)
    assert sorted(done) == [2, 4]
    meta = json.loads((done[4] / "meta.json").read_text())
    assert meta["lr_peak"] == 1e-3 and meta["config"]["memory"]["strategy"] == "stream"


def _fake_sweep(cfg, best_lr: float) -> Path:
    """A finished sweep's records as run_sweep leaves them: the stored config and best_lr.json."""
    from redheart_tune.config import config_to_dict
    from redheart_tune.layout import CONFIG_FILE, best_lr_path, experiment_dir
    from redheart_tune.util.files import write_json_atomic

    write_json_atomic(
        experiment_dir(cfg, "sweep") / CONFIG_FILE, {"stage": "sweep", "config": config_to_dict(cfg)}
    )
    write_json_atomic(
        best_lr_path(cfg), {"best_lr": best_lr, "experiment": str(experiment_dir(cfg, "sweep"))}
    )
    return best_lr_path(cfg)


def test_train_takes_only_its_own_runs_sweep_result(smoke_cfg):
    from redheart_tune.tune.train import choose_lr

    other = _fake_sweep(smoke_cfg("run.name=tiny-sweep", "model.dropout=0.3"), 7e-4)
    cfg = smoke_cfg()
    # Another run's sweep is never picked up by itself (it once was: lr_sweep/ sat beside every run).
    lr, source = choose_lr(cfg, explicit_lr=False)
    assert lr == cfg.optim.lr and "no sweep result" in source
    # The run's own sweep is; a sweep the user names is, with a note on what differs; optim.lr= wins.
    _fake_sweep(cfg, 3e-4)
    assert choose_lr(cfg, explicit_lr=False) == (
        3e-4,
        str(other.parents[2] / "smoke" / "lr_sweep" / "best_lr.json"),
    )
    assert choose_lr(cfg, explicit_lr=False, lr_from=other.parents[1]) == (
        7e-4,
        f"--lr-from {other.parents[1]}",
    )
    assert choose_lr(cfg, explicit_lr=True)[0] == cfg.optim.lr
    with pytest.raises(ExperimentError, match="not both"):
        choose_lr(cfg, explicit_lr=True, lr_from=other)
    with pytest.raises(ExperimentError, match="no best_lr.json"):
        choose_lr(cfg, explicit_lr=False, lr_from=other.parents[2] / "nowhere")


def test_a_sweep_of_another_model_gives_its_run_no_lr(smoke_cfg):
    from redheart_tune.tune.train import choose_lr

    _fake_sweep(smoke_cfg("model.dropout=0.3", "sweep.epochs=4"), 7e-4)
    # The sweep's own settings (epochs) do not matter; its model does.
    with pytest.raises(ExperimentError, match=r"model\.dropout: 0\.3 in the sweep, 0\.1 now"):
        choose_lr(smoke_cfg(), explicit_lr=False)
    assert choose_lr(smoke_cfg("model.dropout=0.3"), explicit_lr=False)[0] == 7e-4


def test_torch_threads_leave_a_core_to_ray_when_a_trial_holds_them_all():
    from redheart_tune.tune.resources import torch_threads

    assert torch_threads(2, cores=2) == 1  # the shipped default on a 2-core machine: 1.16x slower with 2
    assert torch_threads(4, cores=16) == 4
    assert torch_threads(16, cores=16) == 15
    assert torch_threads(0.5, cores=2) == torch_threads(1, cores=1) == 1


def test_a_trial_sets_torch_threads_from_the_cpus_ray_gives_it(smoke_cfg, ray_session):
    from redheart_tune.config import cache_dir
    from redheart_tune.data import prepare_data
    from redheart_tune.layout import experiment_dir
    from redheart_tune.tune.resources import torch_threads
    from redheart_tune.tune.train import run_train

    # The shipped default leaves torch_threads unset and asks for 2 CPUs; the session's Ray has 2.
    cfg = smoke_cfg("resources.torch_threads=null", "resources.cpus_per_trial=2", "train.epochs=2")
    prepare_data(cfg.data, cache_dir(cfg), show_progress=False)
    run_train(cfg)
    (ckpt,) = checkpoints_of(experiment_dir(cfg, "train")).values()
    assert verify_checkpoint(ckpt).meta["device"]["threads"] == torch_threads(2)
