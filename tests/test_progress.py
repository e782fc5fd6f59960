"""Watching a run: progress inside an epoch (redheart_tune/engine/progress.py) on the console, in `status` and in TensorBoard;
the dead-driver warning; `status --watch`; `--dashboard` and its sign-in."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from redheart_tune.engine.loop import StepInfo
from redheart_tune.engine.progress import (
    PROGRESS_FILE,
    STEPS_DIR,
    Progress,
    estimate,
    format_seconds,
    startup_line,
    step_memory,
)
from redheart_tune.pipeline.status import (
    STALL_EPOCHS,
    STALL_MIN_S,
    STALL_START_S,
    allowed_silence_s,
    live_lines,
    print_status,
    run_status,
    stalled,
)
from redheart_tune.tune.dashboard import dashboard_lines
from tests.conftest import REPO

# Any finite duration format_seconds writes: "0.4 s", "45 s", "2 min", "12 min 5 s", "3 h", "2 d 4 h".
DURATION = r"([\d.]+ s|\d+ (d|h|min)( \d+ (h|min|s))?)"
BUDGET_GB = 0.024  # as in test_memory_tune: most units stream, so every step moves bytes and has a peak


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the TensorBoard event files in ``directory``, read as TensorBoard does:
    records of (length, crc, Event protobuf, crc); tensorboardX ships the protobuf, tensorboard is not needed."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


# ---------------------------------------------------------------------------
# The arithmetic


def test_eta_of_a_first_epoch_runs_at_its_own_pace_and_leaves_validation_out():
    est = estimate(step=5, steps_per_epoch=20, elapsed_s=10.0, rows=320, epochs_after=3)
    assert est.samples_per_s == 32.0
    assert est.epoch_eta_s == 30.0  # 15 steps at 2 s
    assert est.epoch_s == 40.0
    assert est.run_eta_s == 30.0 + 3 * 40.0
    assert not est.validation_measured


def test_eta_of_later_epochs_takes_the_measured_epochs_and_their_validation():
    est = estimate(
        step=5,
        steps_per_epoch=20,
        elapsed_s=10.0,
        rows=320,
        epochs_after=2,
        train_epoch_s=50.0,
        validation_s=8.0,
    )
    assert est.epoch_eta_s == 30.0  # this epoch: its own pace
    assert est.epoch_s == 58.0
    assert est.run_eta_s == 30.0 + 8.0 + 2 * 58.0  # this epoch's validation, then two whole epochs
    assert est.validation_measured
    last = estimate(step=20, steps_per_epoch=20, elapsed_s=40.0, rows=1280, epochs_after=0, validation_s=8.0)
    assert last.epoch_eta_s == 0.0 and last.run_eta_s == 8.0


def test_durations_read_as_a_person_says_them():
    assert [format_seconds(s) for s in (0.42, 45, 120, 725, 10_800, 12_000, 190_000)] == [
        "0.4 s",
        "45 s",
        "2 min",
        "12 min 5 s",
        "3 h",
        "3 h 20 min",
        "2 d 4 h",
    ]
    # The pattern the live-run tests match ETAs with accepts every one of them, whole.
    for seconds in (0.42, 45, 60, 120, 725, 3600, 10_800, 12_000, 86_400, 190_000):
        assert re.fullmatch(DURATION, format_seconds(seconds)), format_seconds(seconds)
    assert format_seconds(float("inf")) == "?"  # an ETA not known yet, which a live run should not print


def test_step_memory_reads_only_the_steps_own_records_without_draining():
    move = SimpleNamespace
    placement = SimpleNamespace(
        trace=[
            {"epoch": 1, "step": 4, "unit": "group_a", "peak_bytes": 900},
            {"epoch": 2, "step": 1, "unit": "group_a", "peak_bytes": 300},
            {"epoch": 2, "step": 1, "unit": "group_b", "peak_bytes": 500},
        ],
        moves=[
            move(epoch=1, step=4, bytes=7),  # validation's, after epoch 1's last step
            move(epoch=2, step=1, bytes=100),
            move(epoch=2, step=1, bytes=20),
        ],
    )
    assert step_memory(placement, 2, 1) == (500, 120)
    assert len(placement.trace) == 3 and len(placement.moves) == 3
    assert step_memory(SimpleNamespace(trace=[], moves=[]), 1, 1) == (None, 0)  # memory not budgeted


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_the_first_epoch_ends_with_what_the_trials_start_cost(tmp_path, capsys):
    """The set-up phases, and the first step's excess over the median of the epoch's later steps (the
    GPU's first-epoch cost: CUDA's initialisation, moments allocated and page-locked), once per trial."""
    clock = Clock()
    progress = Progress(tmp_path / "t", stage="train", lr_peak=1e-3, epochs=3, print_every_s=0, clock=clock)
    progress.placement = SimpleNamespace(home_bytes=3 * 2**30, home_s=4.5)
    progress.started_after({"device": 1.5, "data": 0.5, "model": 2.0, "plan": 0.25, "placement": 6.0})
    elapsed = 0.0
    for epoch in (3, 4):  # a resumed trial: its first epoch is 3
        for i, step_s in enumerate([9.0, 1.0, 1.2, 0.9] if epoch == 3 else [1.0] * 4, start=1):
            elapsed = step_s + (elapsed if i > 1 else 0.0)
            clock.t += step_s
            progress.step(StepInfo(epoch, i, 4, 32, 0.5, 1e-3, 1.2, elapsed))
        progress.end_epoch(epoch)
    s = progress.startup
    assert s["first_step_s"] == 9.0 and s["typical_step_s"] == 1.0 and s["first_step_extra_s"] == 8.0
    assert s["total_s"] == pytest.approx(10.25 + 8.0)
    (line,) = capsys.readouterr().out.strip().splitlines()  # printed once, after the first epoch only
    assert line == startup_line("train", s)
    assert line == (
        "[train] start-up cost 18 s: set-up (device 1.5 s, data 0.5 s, model 2.0 s, plan 0.2 s, placement 6.0 s);"
        " first step 9.0 s against 1.0 s for the later ones; home buffers 3.00 GiB allocated in 4.5 s"
    )


def test_progress_prints_by_the_clock_writes_the_file_and_one_scalar_per_step(tmp_path, capsys):
    clock = Clock()
    trial = tmp_path / "lr_1.00e-03_abcde_00000"
    progress = Progress(
        trial, stage="train", lr_peak=1e-3, epochs=2, print_every_s=10, clock=clock, now=clock
    )
    record = json.loads((trial / PROGRESS_FILE).read_text())
    assert record["state"] == "starting" and record["trial"] == trial.name

    def step(epoch, i, seconds):
        clock.t += 1.0
        progress.step(StepInfo(epoch, i, 4, 32, 0.5, 1e-3, 1.2, seconds), memory=(2**20, 3 * 2**20))

    for i in range(1, 5):  # 1 s per step; the line after 10 s of the clock, not every step
        step(1, i, float(i))
    assert capsys.readouterr().out == ""
    record = json.loads((trial / PROGRESS_FILE).read_text())
    assert record["state"] == "validating" and record["step"] == 4 and record["samples_per_s"] == 32.0
    assert record["run_eta_s"] == pytest.approx(4.0) and not record["validation_measured"]

    clock.t += 2.0  # validation
    progress.end_epoch(1)
    record = json.loads((trial / PROGRESS_FILE).read_text())
    assert record["state"] == "validated" and record["validation_s"] == pytest.approx(2.0)
    assert record["run_eta_s"] == pytest.approx(6.0)  # one more epoch: 4 s of training, 2 s of validation

    clock.t += 10.0
    step(2, 1, 1.0)
    line = capsys.readouterr().out.strip()
    assert line == (
        "[train] lr=1.0e-03  epoch 2/2  step 1/4 (25 %)  loss 0.5000  32 samples/s"
        "  epoch ETA 3.0 s  run ETA 5.0 s"
    )
    for i in range(2, 5):
        step(2, i, float(i))
    clock.t += 2.0
    progress.end_epoch(2)
    assert json.loads((trial / PROGRESS_FILE).read_text())["state"] == "finished"

    scalars = read_scalars(trial / STEPS_DIR)
    assert [s for s, _ in scalars["step/loss"]] == list(range(1, 9))  # one per optimizer step, run-wide
    assert {v for _, v in scalars["step/memory_peak_mb"]} == {1.0}
    assert {v for _, v in scalars["step/moved_mb"]} == {3.0}
    assert {"step/lr", "step/grad_norm", "step/samples_per_s"} <= set(scalars)


# ---------------------------------------------------------------------------
# The dead-driver rule and what status says


def test_the_silence_a_live_run_may_keep_is_n_epochs_at_least_the_floor():
    assert allowed_silence_s({"epoch_s": 600.0}) == STALL_EPOCHS * 600.0
    assert allowed_silence_s({"epoch_s": 1.0}) == STALL_MIN_S
    assert allowed_silence_s({"state": "starting", "epoch_s": None}) == STALL_START_S
    assert allowed_silence_s({"epoch_s": 1.0, "upload_lag_s": 300.0}) == STALL_MIN_S + 300.0  # a bucket's lag
    records = [{"updated": 1000.0, "epoch_s": 100.0}, {"updated": 1200.0, "epoch_s": 100.0}]
    assert stalled(records, now=1200.0 + 300.0) is None  # the newest record counts: 300 s = 3 epochs
    assert stalled(records, now=1200.0 + 301.0) == (301.0, 300.0)
    assert stalled([], now=1e9) is None


def record(name: str, state: str, updated: float, **extra) -> dict:
    return {
        "trial": name,
        "stage": "sweep",
        "epochs": 5,
        "started": updated - 100,
        "state": state,
        "epoch": 2,
        "step": 10,
        "steps_per_epoch": 40,
        "rows": 640,
        "loss": 0.4321,
        "samples_per_s": 64.0,
        "epoch_eta_s": 30.0,
        "run_eta_s": 150.0,
        "epoch_s": 45.0,
        "validation_measured": True,
        "updated": updated,
        **extra,
    }


def write_trials(experiment: Path, *records: dict) -> None:
    for r in records:
        (experiment / r["trial"]).mkdir(parents=True)
        (experiment / r["trial"] / PROGRESS_FILE).write_text(json.dumps(r))


def test_status_shows_a_running_sweep_trials_progress_and_eta(tmp_path):
    now = 50_000.0
    write_trials(
        tmp_path,
        record("lr_1.00e-04_aaaaa_00000", "finished", now - 60),
        record("lr_1.00e-03_aaaaa_00001", "training", now - 5),
    )
    status = SimpleNamespace(path=tmp_path, trials={"aaaaa_00000": "TERMINATED", "aaaaa_00001": "RUNNING"})
    lines = live_lines(status, now)
    assert len(lines) == 1  # the finished trial is Tune's record's business
    assert "lr_1.00e-03_aaaaa_00001: epoch 2/5, step 10/40 (25 %), 64 samples/s, loss 0.4321" in lines[0]
    assert "epoch ETA 25 s, run ETA 2 min 25 s (about " in lines[0]  # counted from now: written 5 s ago
    assert "updated 5.0 s ago" in lines[0]


def test_status_names_a_dead_driver_and_the_resume_command(tmp_path):
    now = 50_000.0
    silence = STALL_EPOCHS * 45.0 + STALL_MIN_S  # longer than 3 epochs and than the floor
    write_trials(tmp_path, record("lr_1.00e-03_bbbbb_00000", "training", now - silence))
    status = SimpleNamespace(path=tmp_path, trials={"bbbbb_00000": "RUNNING"})
    last, warning = live_lines(status, now)
    assert (
        last.strip() == "last lr_1.00e-03_bbbbb_00000: epoch 2/5, step 10/40 (25 %); written 4 min 15 s ago"
    )
    assert warning.strip().startswith("WARNING stalled: no trial has written progress for 4 min 15 s")
    assert warning.endswith(f"continue it with: python run.py resume {tmp_path}")
    # the same silence after Tune recorded the end: no warning, nothing live
    assert live_lines(SimpleNamespace(path=tmp_path, trials={"bbbbb_00000": "TERMINATED"}), now) == []
    # a live run's pause shorter than its allowance: no warning
    assert not any("WARNING" in line for line in live_lines(status, now - silence + 100))


def test_status_watch_reprints_until_ctrl_c(smoke_cfg, monkeypatch, capsys):
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", sleep)
    print_status(smoke_cfg(), "", watch_s=2.5)
    out = capsys.readouterr().out
    assert sleeps == [2.5, 2.5]
    assert len(re.findall(r"\[status\] \d\d:\d\d:\d\d, every 2.5 s until Ctrl-C", out)) == 2
    assert out.count("sweep     not started") == 2


def test_dashboard_sign_in_says_where_and_how():
    token = dashboard_lines("127.0.0.1:8265", joined=False, auth_mode="token")
    assert token[0] == "[dashboard] Ray's dashboard, on this machine only: http://127.0.0.1:8265"
    assert "ssh -N -L 8265:127.0.0.1:8265" in token[1]
    assert "`ray get-auth-token`" in token[2]
    assert "no sign-in" in dashboard_lines("http://127.0.0.1:8266", joined=False, auth_mode="disabled")[2]
    assert "head node" in dashboard_lines("10.0.0.5:8265", joined=True, auth_mode="token")[2]
    assert "without its dashboard" in dashboard_lines(None, joined=False)[0]


# ---------------------------------------------------------------------------
# For real: a short training through Tune, watched while it runs


def get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_training_run_shows_its_progress_eta_per_step_scalars_and_dashboard(smoke_cfg, tmp_path):
    overrides = [
        "train.epochs=15",
        "train.progress_every_s=0.5",
        "memory.strategy=stream",
        f"memory.gpu_budget_gb={BUDGET_GB}",
    ]
    cfg = smoke_cfg(*overrides)
    args = [
        str(REPO / "configs" / "smoke.yaml"),
        f"run.output_root={cfg.run.output_root}",
        f"data.cache_dir={cfg.data.cache_dir}",
        *overrides,
    ]
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, str(REPO / "run.py"), "train", *args, "--dashboard"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    experiment = Path(cfg.run.output_root) / "smoke" / "train"
    try:
        # The dashboard, as soon as Ray is up: on loopback, signed out without the token, in with it.
        pattern = r"\[dashboard\] Ray's dashboard, on this machine only: (http://127\.0\.0\.1:\d+)"
        deadline = time.monotonic() + 300
        while not (url := re.search(pattern, log.read_text())) and driver.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert url, log.read_text()[-3000:]
        ray_cli = Path(sys.executable).parent / "ray"
        token = subprocess.run([ray_cli, "get-auth-token"], capture_output=True, text=True, check=True).stdout
        code, body = get(f"{url[1]}/api/authentication_mode")
        assert code == 200 and json.loads(body)["authentication_mode"] == "token"
        assert get(f"{url[1]}/api/version")[0] == 401  # signed out
        assert get(f"{url[1]}/api/version", token.strip())[0] == 200

        # While it trains: status gives the trial's place in its epoch and the ETAs.
        now_line = None
        while now_line is None and driver.poll() is None and time.monotonic() < deadline:
            files = list(experiment.glob(f"*/{PROGRESS_FILE}"))
            if files and json.loads(files[0].read_text())["state"] == "training":
                now_line = next((x for x in run_status(cfg, "") if x.strip().startswith("now ")), None)
            time.sleep(0.2)
        assert now_line is not None, log.read_text()[-3000:]
        assert re.search(
            r"epoch \d+/15, step \d/5 \(\d+ %\), \d+ samples/s, loss [\d.]+; epoch ETA", now_line
        )
        assert re.search(rf"run ETA {DURATION} \(about ", now_line), now_line
    finally:
        rc = driver.wait(timeout=600)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert re.search(r"\[train\] lr=1\.0e-03  epoch \d+/15  step \d/5 \(\d+ %\)  loss .* run ETA ", text)

    (trial,) = [p.parent for p in experiment.glob(f"*/{PROGRESS_FILE}")]
    assert json.loads((trial / PROGRESS_FILE).read_text())["state"] == "finished"
    steps = read_scalars(trial / STEPS_DIR)
    assert [s for s, _ in steps["step/loss"]] == list(range(1, 15 * 5 + 1))  # 5 optimizer steps an epoch
    assert all(0 < v <= BUDGET_GB * 1024 for _, v in steps["step/memory_peak_mb"])
    assert all(v > 0 for _, v in steps["step/moved_mb"])  # streamed units cross every step
    epochs = read_scalars(trial)  # Tune's own per-epoch rows, beside them
    assert [s for s, _ in epochs["ray/tune/train_loss"]] == list(range(1, 16))
