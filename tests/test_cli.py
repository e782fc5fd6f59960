"""run.py as a user types it: `all` end to end on the smoke config, a rerun that reuses it, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent


def run_py(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_all_runs_every_stage_and_a_rerun_reuses_them(tmp_path, data_cache):
    args = [
        "all",
        str(REPO / "configs" / "smoke.yaml"),
        f"run.output_root={tmp_path}",
        f"data.cache_dir={data_cache}",
    ]
    first = run_py(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "smoke"  # every output of the run under its own directory, nothing beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoke"]
    for f in [
        "lr_sweep/best_lr.json",
        "lr_sweep/lr_sweep.png",
        "lr_sweep/lr_sweep.csv",
        "analysis/sweet_spots.json",
        "analysis/learning_curves.png",
        "analysis/sweet_spot_heatmap.png",
        "analysis/sweet_spot_heatmap.csv",
        "analysis/results.csv",
        "analysis/selection.json",
        "final/crossover.safetensors",
        "final/crossover.json",
        "sweep/redheart_config.json",
        "train/redheart_config.json",
        "train/session_info_final.json",
    ]:
        assert (run / f).is_file(), f
    assert not (run / "lr_sweep" / "lr_sweep_all.csv").exists()  # the figure's CSV holds that table
    for copy in ("results_all_seeds.csv", "intervals_summary.csv"):  # one seed: results.csv, intervals.csv
        assert not (run / "analysis" / copy).exists(), copy
    figure_rows = pd.read_csv(run / "lr_sweep" / "lr_sweep.csv")
    assert {"lr_peak", "epoch", "val_loss", "train_loss", "selection_score"} <= set(figure_rows)
    results = pd.read_csv(run / "analysis" / "results.csv")
    assert set(results["method"]) == {
        "crossover",
        "crossover_ensemble",
        "group_window_soup",
        "group_greedy_soup",
        "learned_fusion",
        "last",
        "best_single",
        "uniform_soup",
        "greedy_soup",
        "topk_ensemble",
    }
    assert results.groupby("split")["rows"].first().to_dict() == {"test": 60, "holdout": 300}
    # Ray's own hint pointed TensorBoard into its temporary session folder; the experiment's is printed.
    assert f"tensorboard --logdir {run / 'train'}" in first.stdout and "/tmp/ray/session" not in first.stdout
    assert "Token authentication is enabled" not in first.stderr
    # Clean output, read whole as a log file holds it (both streams piped, no terminal): no traceback
    # from a worker's shutdown, no colour codes, Ray's checkpoint line at most once per checkpoint
    # (it was printed twice), and the crossover's spots as a table, not Python dicts.
    output = first.stdout + first.stderr
    for dirty in ("Traceback", "Exception ignored", "\x1b["):
        assert dirty not in output, (dirty, output[-3000:])
    checkpoints = list((run / "train").glob("*/checkpoint_*"))
    assert len(checkpoints) == 3 and output.count("Checkpoint successfully created") <= len(checkpoints)
    assert "[crossover] smoke: the epoch each unit comes from" in first.stdout
    assert "{'group_a'" not in first.stdout and "variant +2" in first.stdout

    again = run_py(*args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "finished; reusing it" in again.stdout
    assert "[train] lr=" not in again.stdout  # nothing was trained twice

    status = run_py("status", *args[1:])
    assert status.returncode == 0, status.stderr
    assert "chosen LR 1.00e-03" in status.stdout and "epoch 6/6 (100 %)" in status.stdout
    assert "every stage is done" in status.stdout

    # A changed LR is never silently reused: all honours optim.lr= (it used to ignore it) and refuses here.
    other_lr = run_py(*args, "optim.lr=2e-3")
    assert other_lr.returncode == 2
    assert other_lr.stderr.strip().splitlines() == [
        f"error: {run / 'train'} was run with another configuration (optim.lr: 0.001 stored, 0.002 now). "
        "Rerun with the stored values, or choose another run.name for a new run."
    ]

    # The analysis stages' errors are one message too, not a traceback (they used to escape main).
    wrong_seed = run_py("report", *args[1:], "run.seed=5")
    assert wrong_seed.returncode == 2 and "Traceback" not in wrong_seed.stderr
    assert f"error: {run / 'train'} was trained with seed 0, not 5" in wrong_seed.stderr
    for manifest in (run / "train").glob("*/checkpoint_*/manifest.json"):
        manifest.unlink()  # every checkpoint now incomplete: no sweet spot can be chosen
    no_spots = run_py("analyze", *args[1:])
    assert no_spots.returncode == 2 and "Traceback" not in no_spots.stderr
    assert [line for line in no_spots.stderr.splitlines() if line.startswith("error:")], no_spots.stderr


def test_all_with_optim_lr_trains_at_that_lr_without_a_sweep(tmp_path, data_cache):
    out = run_py(
        "all",
        str(REPO / "configs" / "smoke.yaml"),
        f"run.output_root={tmp_path}",
        f"data.cache_dir={data_cache}",
        "optim.lr=2e-3",
        "train.epochs=4",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    info = json.loads((tmp_path / "smoke" / "train" / "session_info.json").read_text())
    assert info["lr"] == 2e-3 and info["lr_source"] == "command line (optim.lr)"
    assert not (tmp_path / "smoke" / "sweep").exists()


@pytest.mark.slow
def test_status_of_a_finished_sweep_suggests_training(tmp_path, data_cache):
    args = [
        str(REPO / "configs" / "smoke.yaml"),
        f"run.output_root={tmp_path}",
        f"data.cache_dir={data_cache}",
    ]
    assert run_py("sweep", *args).returncode == 0
    out = run_py("status", *args)
    assert out.returncode == 0, out.stderr
    assert f"sweep     {tmp_path / 'smoke' / 'sweep'}: finished, 2 of 2 trials done" in out.stdout
    assert "chosen LR 1.00e-03" in out.stdout and "training  not started" in out.stdout
    assert out.stdout.strip().endswith(f"[status] next: python run.py train {' '.join(args)}")
    changed = run_py("status", *args, "sweep.epochs=4")
    assert "differs from the given config (sweep.epochs: 3 there, 4 given)" in changed.stdout
    assert "reusing it with this config is refused" in changed.stdout
    # ...and the next step is not one that would be refused: it keeps the stored value.
    assert changed.stdout.strip().endswith(
        f"[status] next: python run.py train {' '.join(args)} sweep.epochs=3"
    )


def test_help_of_every_subcommand():
    commands = ["sweep", "train", "resume", "analyze", "crossover", "report", "all", "status", "prepare"]
    for command in [*commands, "params"]:
        out = run_py(command, "--help", timeout=60)
        assert out.returncode == 0 and out.stdout.startswith(f"usage: run.py {command}"), (
            command,
            out.stderr,
        )
    assert "--lr-from PATH" in run_py("train", "--help", timeout=60).stdout


def test_prepare_builds_the_cache_an_offline_machine_trains_from(tmp_path, data_cache, monkeypatch):
    """`prepare` where the encoder is; the folder it names then serves every text of the data and the
    held-out set with the encoder package gone (an offline GPU node), and encodes nothing."""
    import shutil
    from importlib.metadata import PackageNotFoundError

    from redheart_tune.config import load_config
    from redheart_tune.data import encoder, prepare_data, prepare_holdout

    cache = tmp_path / "cache"
    if (data_cache / "vader").is_dir():  # the VADER files other tests fetched; the encodings start empty
        shutil.copytree(data_cache / "vader", cache / "vader")
    overrides = [f"data.cache_dir={cache}", "data.max_samples=60", "data.holdout_max_samples=20"]
    out = run_py("prepare", "configs/smoke.yaml", *overrides, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "60 of 23,703 records used" in out.stdout and "held-out set of 20 records" in out.stdout, out.stdout
    assert f"data cache: {cache};" in out.stdout

    def not_installed(name):
        raise PackageNotFoundError(name)

    def refuse(*args, **kwargs):
        raise AssertionError("the encoder must not be loaded: prepare encoded every text")

    monkeypatch.setattr(encoder, "version", not_installed)
    monkeypatch.setattr(encoder, "load_encoder", refuse)
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides)
    assert len(prepare_data(cfg.data, cache, show_progress=False)) == 60
    assert len(prepare_holdout(cfg.data, cache, show_progress=False)) == 20


def test_user_errors_are_one_line_and_a_traceback_only_with_debug(tmp_path):
    smoke = str(REPO / "configs" / "smoke.yaml")
    cases = {
        ("all", "--seeds"): "argument --seeds: expected one argument",
        ("all", "--seeds", "two"): "argument --seeds: 'two' is not a whole number >= 1",
        ("sweep", smoke, smoke): "one config file, then key=value overrides",
        (
            "analyze",
            smoke,
            f"run.output_root={tmp_path}",
        ): f"{tmp_path / 'smoke' / 'train'}: no training yet; run `python run.py train` first",
        ("resume", str(tmp_path)): "not an experiment started by run.py",
    }
    for args, message in cases.items():
        out = run_py(*args, timeout=120)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr, (args, out.stderr)
    debug = run_py("--debug", "analyze", smoke, f"run.output_root={tmp_path}", timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ExperimentReadError" in debug.stderr


def test_bad_config_is_one_clear_error(tmp_path):
    out = run_py(
        "sweep",
        str(REPO / "configs" / "smoke.yaml"),
        "sweep.epoch=3",
        "optim.lr=fast",
        f"run.output_root={tmp_path}",
    )
    assert out.returncode == 2
    assert (
        "2 problem(s)" in out.stderr
        and "sweep.epoch: unknown key" in out.stderr
        and "optim.lr: 'fast'" in out.stderr
    )
    assert not (tmp_path / "smoke").exists()  # nothing started


def test_analyze_crossover_and_report_before_training_say_to_train_first(tmp_path):
    from redheart_tune.analysis.experiment import ExperimentReadError
    from redheart_tune.config import load_config
    from redheart_tune.pipeline.stages import BY_NAME

    cfg = load_config(REPO / "configs" / "smoke.yaml", [f"run.output_root={tmp_path}"])
    for command in ("analyze", "crossover", "report"):
        with pytest.raises(ExperimentReadError, match=r"no training yet; run `python run\.py train` first"):
            BY_NAME[command](cfg)
    assert not (tmp_path / "smoke").exists()  # nothing written


# Every command that takes a config, with a typo'd key, in one fresh interpreter; then what it imported.
CONFIG_ERROR_BEFORE_IMPORTS = """
import contextlib, io, json, sys
import run

commands = [[c] for c in ("sweep", "train", "analyze", "crossover", "report", "all", "status", "params")]
results = {}
for command in [*commands, ["sweep", "--dashboard"]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run.main([*command, "configs/default.yaml", "optim.lrr=1"])
    results[" ".join(command)] = [code, err.getvalue()]
print(json.dumps({"results": results, "heavy": [m for m in ("torch", "ray") if m in sys.modules]}))
"""


def test_a_config_error_is_reported_before_torch_or_ray_is_imported():
    """A typo'd key is reported in a fraction of a second, not after the seconds torch and Ray take to
    import (18-113 s on a loaded 2-core machine): each command validates its config first."""
    out = subprocess.run(
        [sys.executable, "-c", CONFIG_ERROR_BEFORE_IMPORTS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for command, (code, stderr) in report["results"].items():
        assert code == 2 and "optim.lrr: unknown key" in stderr, (command, code, stderr)
    assert report["heavy"] == [], f"imported before the config error was reported: {report['heavy']}"


def test_params_prints_the_730m_table_with_targets():
    out = run_py("params", str(REPO / "configs" / "redheart-730m.yaml"), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "vs. the original (730M)" in out.stdout and "does NOT fit" in out.stdout


@pytest.mark.slow
def test_all_with_seeds_trains_the_further_seeds_as_one_tune_experiment(tmp_path, data_cache):
    args = [
        "all",
        str(REPO / "configs" / "smoke.yaml"),
        f"run.output_root={tmp_path}",
        f"data.cache_dir={data_cache}",
        "sweep.lrs=[1.0e-3]",
        "train.epochs=2",
        "--seeds",
        "3",
    ]
    done = run_py(*args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "smoke"
    trials = sorted(p.name.split("_")[0] for p in (run / "seeds" / "train").iterdir() if p.is_dir())
    assert trials == ["seed1", "seed2"]  # one Tune experiment, one trial per further seed
    for seed in (1, 2):
        results = pd.read_csv(run / "seeds" / f"seed{seed}" / "analysis" / "results.csv")
        assert set(results["seed"]) == {seed}
        assert (run / "seeds" / f"seed{seed}" / "final" / "crossover.safetensors").is_file()
    summary = pd.read_csv(run / "analysis" / "seeds" / "results_summary.csv")
    assert set(summary["n_seeds"]) == {3}
    # status shows the further seeds (it used to say "every stage is done" while they trained)
    status = run_py("status", *args[1:5])
    assert status.returncode == 0, status.stderr
    assert f"seeds     {run / 'seeds' / 'train'}: finished, seeds [1, 2] (all --seeds 3)" in status.stdout
    assert (
        "seed 1: epoch 2/2, TERMINATED" in status.stdout and "seed 2: epoch 2/2, TERMINATED" in status.stdout
    )
    (run / "analysis" / "seeds" / "intervals_summary.csv").unlink()
    status = run_py("status", *args[1:5])
    assert "summary over the seeds: not yet" in status.stdout
    assert f"[status] next: python run.py all --seeds 3 {' '.join(args[1:5])}" in status.stdout
    resumed = run_py("resume", str(run / "seeds" / "train"))
    assert resumed.returncode == 2 and "continue them with python run.py all --seeds 3" in resumed.stderr
    again = run_py(*args[:-1], "4")
    assert again.returncode == 2 and "trained seeds [1, 2]; [1, 2, 3] now" in again.stderr


def test_status_compares_the_training_with_the_lr_train_would_use(tmp_path):
    from redheart_tune.config import load_config
    from redheart_tune.layout import best_lr_path
    from redheart_tune.pipeline.status import training_config

    cfg = load_config(REPO / "configs" / "default.yaml", [f"run.output_root={tmp_path}"])
    assert training_config(cfg, "").optim.lr == cfg.optim.lr  # no sweep yet: the config's LR
    best = best_lr_path(cfg)
    best.parent.mkdir(parents=True)
    best.write_text(json.dumps({"best_lr": 5e-4, "experiment": str(tmp_path / "gone")}))
    # The run's own sweep decides, as in `train` and `all` (status used to call such a run "refused").
    assert training_config(cfg, "").optim.lr == 5e-4
    assert training_config(cfg, "configs/default.yaml optim.lr=2e-3").optim.lr == cfg.optim.lr


def _train_args(tmp_path, data_cache) -> list[str]:
    """A two-epoch training at a given LR: the shortest run that holds a run's lock while it trains."""
    smoke = str(REPO / "configs" / "smoke.yaml")
    return [
        smoke,
        f"run.output_root={tmp_path}",
        f"data.cache_dir={data_cache}",
        "optim.lr=1e-3",
        "train.epochs=2",
    ]


def test_a_second_driver_on_a_running_run_refuses_at_once(tmp_path, data_cache):
    """Two drivers on one run name: the second refuses, naming the run, the host and pid holding it and
    since when, and starts nothing; the run holds one set of trials (two drivers used to run into the
    same experiment, two sets of trials and two experiment states)."""
    import socket
    import time

    args = ["train", *_train_args(tmp_path, data_cache)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        holder = tmp_path / "smoke" / "run.lock.json"
        deadline = time.time() + 120
        while not holder.is_file():
            assert first.poll() is None and time.time() < deadline, "the first driver never took the lock"
            time.sleep(0.2)
        started = time.time()
        second = run_py(*args)
        took = time.time() - started
        out, _ = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, out[-3000:]
    assert second.returncode == 2 and took < 30, (took, second.stderr)
    assert second.stderr.startswith(
        f"error: run 'smoke' ({tmp_path / 'smoke'}) is in use by pid {first.pid} on {socket.gethostname()} since "
    ), second.stderr
    assert "one driver at a time per run" in second.stderr and "Traceback" not in second.stderr
    assert "[train]" not in second.stdout  # nothing started
    train = tmp_path / "smoke" / "train"
    assert len([p for p in train.iterdir() if p.is_dir() and p.name.startswith("lr_")]) == 1
    assert len(list(train.glob("experiment_state-*.json"))) == 1
    assert not holder.exists()  # released at the end


@pytest.mark.slow
def test_a_lock_left_by_a_killed_driver_is_taken_over_and_said(tmp_path, data_cache):
    """A driver killed while it held the run leaves its record; status says so, and the next command
    (train, then resume) takes the run over with one line naming the driver that is gone."""
    import socket

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs on this host
    run = tmp_path / "smoke"
    run.mkdir()
    (run / "run.lock").touch()
    left = {
        "run": "smoke",
        "host": socket.gethostname(),
        "pid": gone.pid,
        "since": "2026-01-01T00:00:00+00:00",
        "command": "python run.py train configs/smoke.yaml",
    }
    (run / "run.lock.json").write_text(json.dumps(left))
    args = _train_args(tmp_path, data_cache)
    said = f"pid {gone.pid} on {socket.gethostname()} since 2026-01-01T00:00:00+00:00"

    status = run_py("status", *args)
    assert status.returncode == 0, status.stderr
    assert f"driver    gone, its lock left behind: {said}" in status.stdout
    assert "the next command takes it over" in status.stdout

    trained = run_py("train", *args)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert f"[run] took over run 'smoke' from a driver that is gone: {said}" in trained.stderr
    assert not (run / "run.lock.json").exists()

    (run / "run.lock.json").write_text(json.dumps(left))  # killed again, during a later command
    resumed = run_py("resume", str(run / "train"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"[run] took over run 'smoke' from a driver that is gone: {said}" in resumed.stderr
    assert "finished; reusing it" in resumed.stdout
    assert "driver" not in run_py("status", *args).stdout.split("\n", 2)[1]  # no driver, no lock left
