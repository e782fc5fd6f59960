"""The analysis stages end to end on a real (fake-metric) Tune experiment: reading, sweet spots,
crossover files, evaluation of every method, and the proof that selection never sees the test split."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import test_analysis_support as sup
import torch
from safetensors.torch import load_file
from test_analysis_support import default_targets, epoch_state, fake_data, fake_meta, fake_metrics, tiny_model

import analysis.evaluate as evaluate_module
from analysis import analyze, crossover, evaluate_all, load_training_run, select_methods, val_only
from analysis.crossover import build_crossover
from analysis.evaluate import METHODS, EvalSettings, EvaluationError
from analysis.experiment import IncompleteCheckpointWarning
from tune.config import Config, config_to_dict
from tune.files import write_json_atomic
from tune.layout import CONFIG_FILE

# Epochs as reported: the run "resumed" after epoch 4 from its epoch-2 checkpoint, so 3 and 4 come twice.
SCHEDULE = (1, 2, 3, 4, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
BROKEN_EPOCH = 8


def _trainable(params: dict) -> None:
    """Reports the schedule's epochs; even epochs carry a real tiny-model checkpoint."""
    from ray.tune import Checkpoint, report

    from tune.checkpoints import write_checkpoint

    base = tiny_model().state_dict()
    targets = default_targets()
    for i, epoch in enumerate(params["schedule"]):
        detail = fake_metrics(epoch, targets)
        flat = {k: v for k, v in detail.items() if not isinstance(v, dict)}
        flat["report_index"] = i  # which report of a repeated epoch survived
        if epoch % 2:
            report(flat)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            d = write_checkpoint(
                Path(tmp) / f"epoch_{epoch:04d}",
                model_state=epoch_state(base, epoch),
                metrics=detail,
                meta=fake_meta(epoch, fingerprint=params["fingerprint"]),
                resume_state=None,
            )
            report(flat, checkpoint=Checkpoint.from_directory(str(d)))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, ray_session):
    from ray import cloudpickle
    from ray.tune import CheckpointConfig, RunConfig, Tuner

    # Ray's workers cannot import modules from tests/; ship the trainable and its helpers by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cloudpickle.register_pickle_by_value(sup)
    root = tmp_path_factory.mktemp("runs")
    data = fake_data()
    tuner = Tuner(
        _trainable,
        param_space={"schedule": list(SCHEDULE), "fingerprint": data.fingerprint},
        run_config=RunConfig(
            name="fake-train",
            storage_path=str(root),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            verbose=0,
        ),
    )
    try:
        result = tuner.fit()[0]
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        cloudpickle.unregister_pickle_by_value(sup)
    assert result.error is None, result.error
    path = root / "fake-train"
    write_json_atomic(path / CONFIG_FILE, {"stage": "train", "config": config_to_dict(Config())})
    # Truncate one checkpoint's weights after the fact: the analysis must name it and skip it.
    ckpts = {
        json.loads((d / "meta.json").read_text())["epoch"]: d for d in Path(result.path).glob("checkpoint_*")
    }
    f = ckpts[BROKEN_EPOCH] / "group_a.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    return path, data


def test_load_training_run(experiment):
    path, _ = experiment
    with pytest.warns(IncompleteCheckpointWarning) as caught:
        run = load_training_run(path)
    messages = " ".join(str(w.message) for w in caught)
    assert "group_a.safetensors" in messages and "truncated" in messages
    assert "epoch 4 has two complete checkpoints" in messages
    # One row per epoch, the later report of a repeated epoch kept.
    assert run.epochs["epoch"].tolist() == list(range(1, 13))
    assert run.epochs.set_index("epoch").loc[4, "report_index"] == 5
    assert sorted(run.complete) == [2, 4, 6, 10, 12]
    broken = [r for r in run.checkpoints if not r.complete]
    assert {r.epoch for r in broken} == {4, BROKEN_EPOCH}  # the superseded copy of 4, and the truncated 8
    assert run.checkpoint_table["epoch"].tolist() == [2, 4, 6, 10, 12]
    assert len(run.modules) == 5 * 18 and set(run.modules.columns) >= {
        "epoch",
        "module",
        "group",
        "unit",
        "val_loss",
        "val_metric",
    }
    assert run.modules.query("module == 'surd' or module == 'heads.surd'")["metric"].tolist()[0] == "accuracy"
    assert run.modules.query("module == 'heads.bentham'")["metric"].iloc[0] == "mae"


def test_analyze_writes_spots_and_figures(experiment, tmp_path):
    path, _ = experiment
    with pytest.warns(IncompleteCheckpointWarning):
        report = analyze(path, tmp_path)
    expected = default_targets()
    expected["advanced_bentham"] = 6  # its best epoch 8 is broken: 6 and 10 tie, the earlier wins
    assert report["sweet_spots"] == expected
    saved = json.loads((tmp_path / "sweet_spots.json").read_text())
    assert saved["sweet_spots"] == expected
    assert any(s["epoch"] == BROKEN_EPOCH for s in saved["skipped_checkpoints"])
    for name in ("learning_curves", "sweet_spot_heatmap", "memory"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
        assert not pd.read_csv(tmp_path / f"{name}.csv").empty


def test_crossover_writes_weights_and_config(experiment, tmp_path):
    path, _ = experiment
    with pytest.warns(IncompleteCheckpointWarning):
        summary = crossover(path, tmp_path, deltas=(-2, 0, 2))
        run = load_training_run(path)
    saved = load_file(str(tmp_path / "crossover.safetensors"))
    model, _ = build_crossover(summary["sweet_spots"], run.complete, run.meta)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)
    info = json.loads((tmp_path / "crossover.json").read_text())
    assert set(info["variants"]) == {"-2", "0", "2"}
    assert info["variants"]["0"] == summary["sweet_spots"]
    assert info["sources"]["group_a"]["epoch"] == summary["sweet_spots"]["group_a"]
    assert info["input_dim"] == 16 and info["config"]["model"]["preset"] == "tiny"


def settings(data) -> EvalSettings:
    cfg = Config()
    return EvalSettings(
        data.tasks, dict(cfg.optim.task_weights), dict(cfg.model.fusion_weights), torch.device("cpu")
    )


def test_evaluate_all_writes_results_for_every_method(experiment, tmp_path):
    path, data = experiment
    with pytest.warns(IncompleteCheckpointWarning):
        results = evaluate_all(path, tmp_path, seed=0, data=data)
    assert results["method"].tolist() == list(METHODS)
    assert set(results["seed"]) == {0} and set(results["split"]) == {"test"}
    for col in ("fused_loss", "emotion_accuracy", "surd_accuracy", "bentham_mae", "regret_mae"):
        assert results[col].notna().all(), col
    # A prediction ensemble has no single training objective; weight methods do.
    assert (
        results.set_index("method").loc["topk_ensemble", "model_loss"]
        != results.set_index("method").loc["topk_ensemble", "model_loss"]
    )
    assert (
        results.set_index("method")["model_loss"].drop(["topk_ensemble", "crossover_ensemble"]).notna().all()
    )
    on_disk = pd.read_csv(tmp_path / "results.csv")
    assert on_disk["method"].tolist() == list(METHODS)
    plan = json.loads((tmp_path / "selection.json").read_text())["plan"]
    assert plan["last"]["epochs"] == [12]
    assert len(plan["uniform_soup"]["epochs"]) == 5
    assert plan["greedy_soup"]["epochs"][0] == plan["best_single"]["epochs"][0]


def test_evaluate_refuses_other_data_and_wrong_seed(experiment, tmp_path):
    path, _ = experiment
    with (
        pytest.warns(IncompleteCheckpointWarning),
        pytest.raises(EvaluationError, match="trained on data split"),
    ):
        evaluate_all(path, tmp_path, data=fake_data(seed=1))
    with pytest.warns(IncompleteCheckpointWarning), pytest.raises(EvaluationError, match="seed 0, not 3"):
        evaluate_all(path, tmp_path, seed=3, data=fake_data())


def test_selection_never_sees_the_test_split(experiment, monkeypatch):
    path, data = experiment
    with pytest.warns(IncompleteCheckpointWarning):
        run = load_training_run(path)
    s = settings(data)

    # 1. The view holds the validation rows only: no test id, label or input offset is in it.
    view = val_only(data)
    assert set(view.splits) == {"val"}
    test_ids = {data.ids[i] for i in data.splits["test"]}
    assert not test_ids & set(view.ids)
    assert len(view.pooled) == len(view.targets["emotion"]) == len(data.splits["val"])

    # 2. Selection refuses data that still has a test split.
    with pytest.raises(EvaluationError, match="pass val_only"):
        select_methods(run, data, s)

    # 3. Every pass selection makes is over "val" of the view.
    seen = []
    real = evaluate_module.iterate_batches

    def spy(d, split, *a, **kw):
        seen.append((split, d.ids))
        return real(d, split, *a, **kw)

    monkeypatch.setattr(evaluate_module, "iterate_batches", spy)
    plan = select_methods(run, view, s)
    assert seen and all(split == "val" and not test_ids & set(ids) for split, ids in seen)
    monkeypatch.undo()

    # 4. Scrambling every test label and input changes nothing selected.
    scrambled = _scramble_test_rows(data)
    assert select_methods(run, val_only(scrambled), s) == plan


def _scramble_test_rows(data):
    import dataclasses

    rng = np.random.default_rng(123)
    rows = data.splits["test"]
    targets = {t: v.copy() for t, v in data.targets.items()}
    for v in targets.values():
        v[rows] = rng.permutation(v[rows]) if v.ndim == 1 else rng.random(v[rows].shape).astype(v.dtype)
    pooled = data.pooled.copy()
    pooled[rows] = rng.standard_normal(pooled[rows].shape).astype(pooled.dtype)
    return dataclasses.replace(data, targets=targets, pooled=pooled)


def test_fake_metrics_match_what_training_reports():
    """The helpers' metrics.json carries every key analysis reads from a real one (see tune/trainable.py)."""
    m = fake_metrics(2, default_targets())
    assert {"train", "val", "grad_stats", "weight_stats", "activation_stats"} <= set(m)
    assert {"module_loss", "module_metric", "task_metric"} <= set(m["val"])
    assert {"epoch", "config", "seed", "data_fingerprint", "tasks", "input_dim"} <= set(fake_meta(2))
