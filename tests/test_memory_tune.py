"""Streamed training through the whole pipeline: `run.py all` with memory.strategy=stream under a byte budget."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.conftest import REPO
from tests.test_cli import run_py

BUDGET_GB = 0.024  # the tiny model's weights, gradients and AdamW moments take 31 MiB: most units stream


@pytest.mark.slow
def test_all_stages_stream_under_a_byte_budget_and_draw_the_dsm_figure(tmp_path, data_cache):
    args = [
        str(REPO / "configs" / "smoke.yaml"),
        f"run.output_root={tmp_path}",
        f"data.cache_dir={data_cache}",
        "memory.strategy=stream",
        f"memory.gpu_budget_gb={BUDGET_GB}",
        "sweep.lrs=[1.0e-3]",
        "train.epochs=4",
    ]
    done = run_py("all", *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "smoke"
    budget = BUDGET_GB * 2**30

    checkpoints = sorted((run / "train").glob("*/checkpoint_*/metrics.json"))
    assert len(checkpoints) == 2
    for path in checkpoints:
        memory = json.loads(path.read_text())["memory"]
        assert memory["strategy"] == "stream" and memory["device"] == "accounting"
        assert memory["budget_bytes"] == int(budget) and len(memory["streamed"]) >= 2
        # every unit turn of every step, each within the budget
        assert memory["trace"] and max(t["peak_bytes"] for t in memory["trace"]) <= budget
        actions = {m["action"] for m in memory["moves"]}
        assert {"stream_in", "stream_out"} <= actions
        assert {m["module"] for m in memory["moves"]} >= set(memory["streamed"])

    figure = run / "analysis" / "memory.png"
    assert figure.is_file()
    table = pd.read_csv(figure.with_suffix(".csv"))
    assert {"epoch", "step", "global_step", "peak_bytes", "moved_bytes"} <= set(table)
    assert len(table) == table["global_step"].max() and (table["moved_bytes"] > 0).all()
    assert table["peak_bytes"].max() <= budget

    results = pd.read_csv(run / "analysis" / "results.csv")
    assert results["emotion_accuracy"].notna().all()
