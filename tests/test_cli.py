"""run.py as a user types it: `all` end to end on the smoke config, a rerun that reuses it, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

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


def test_all_runs_every_stage_and_a_rerun_reuses_them(tmp_path, data_cache):
    args = [
        "all",
        str(REPO / "configs" / "smoke.yaml"),
        f"run.output_root={tmp_path}",
        f"data.cache_dir={data_cache}",
    ]
    first = run_py(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for f in [
        "lr_sweep/best_lr.json",
        "lr_sweep/lr_sweep.png",
        "lr_sweep/lr_sweep_all.csv",
        "analysis/sweet_spots.json",
        "analysis/learning_curves.png",
        "analysis/sweet_spot_heatmap.png",
        "analysis/sweet_spot_heatmap.csv",
        "analysis/results.csv",
        "analysis/selection.json",
        "final/crossover.safetensors",
        "final/crossover.json",
        "smoke-train/session_info_final.json",
    ]:
        assert (tmp_path / f).is_file(), f
    results = pd.read_csv(tmp_path / "analysis" / "results.csv")
    assert set(results["method"]) == {
        "crossover",
        "crossover_ensemble",
        "last",
        "best_single",
        "uniform_soup",
        "greedy_soup",
        "topk_ensemble",
    }
    assert (results["split"] == "test").all()

    again = run_py(*args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "already finished; reusing it" in again.stdout
    assert "[train] lr=" not in again.stdout  # nothing was trained twice


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
    assert not (tmp_path / "smoke-sweep").exists()  # nothing started


def test_params_prints_the_730m_table_with_targets():
    out = run_py("params", str(REPO / "configs" / "redheart-730m.yaml"), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "vs. the original (730M)" in out.stdout and "does NOT fit" in out.stdout
