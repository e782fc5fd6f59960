"""The analysis stages end to end on a real (fake-metric) Tune experiment: reading, sweet spots,
crossover files, evaluation of every method on both held-out sets with its intervals, the group soups
and the learned fusion, and the proof that selection never sees the test split or the held-out set."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import test_analysis_support as sup
import torch
from safetensors.torch import load_file
from test_analysis_support import (
    default_targets,
    epoch_state,
    fake_data,
    fake_holdout,
    fake_meta,
    fake_metrics,
    tiny_model,
)

import redheart_tune.analysis.evaluate as evaluate_module
import redheart_tune.pipeline.analysis as pipeline_module
from redheart_tune.analysis import load_training_run, select_methods, val_only
from redheart_tune.analysis.crossover import build_crossover
from redheart_tune.analysis.evaluate import (
    METHODS,
    EvalSettings,
    EvaluationError,
    fused_task_loss,
    iter_models,
    predict_modules,
    split_targets,
    unit_val_loss,
)
from redheart_tune.analysis.experiment import IncompleteCheckpointWarning
from redheart_tune.analysis.fusion import fit_simplex_weights, learn_fusion_weights
from redheart_tune.analysis.seeds import load_row_scores
from redheart_tune.analysis.selection import group_greedy_members
from redheart_tune.analysis.soups import build_group_soup, window_members
from redheart_tune.analysis.sweet_spots import select_sweet_spots, unit_scores
from redheart_tune.analysis.weights import model_for_state
from redheart_tune.config import Config, config_to_dict, load_config
from redheart_tune.engine.checkpoints import load_model_state
from redheart_tune.layout import CONFIG_FILE
from redheart_tune.model.family import fuse
from redheart_tune.model.groups import MODULE_TASK, selection_units
from redheart_tune.pipeline import analyze, crossover, evaluate_all
from redheart_tune.util.files import write_json_atomic

# Epochs as reported: the run "resumed" after epoch 4 from its epoch-2 checkpoint, so 3 and 4 come twice.
SCHEDULE = (1, 2, 3, 4, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
BROKEN_EPOCH = 8


def _trainable(params: dict) -> None:
    """Reports the schedule's epochs; even epochs carry a real tiny-model checkpoint."""
    from ray.tune import Checkpoint, report

    from redheart_tune.engine.checkpoints import write_checkpoint

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
    holdout = fake_holdout()
    with pytest.warns(IncompleteCheckpointWarning):
        results = evaluate_all(path, tmp_path, seed=0, data=data, holdout=holdout)
    # One row per method on each held-out set, the test split first.
    assert results["method"].tolist() == list(METHODS) * 2
    assert results["split"].tolist() == ["test"] * len(METHODS) + ["holdout"] * len(METHODS)
    assert results.groupby("split")["rows"].first().to_dict() == {"test": 15, "holdout": 24}
    assert set(results["seed"]) == {0}
    for col in ("fused_loss", "emotion_accuracy", "surd_accuracy", "bentham_mae", "regret_mae"):
        assert results[col].notna().all(), col
    # A prediction ensemble has no single training objective; weight methods do.
    by = results[results["split"] == "test"].set_index("method")
    assert np.isnan(by.loc["topk_ensemble", "model_loss"])
    assert by["model_loss"].drop(["topk_ensemble", "crossover_ensemble"]).notna().all()
    # The learned fusion is the crossover's weights: same training objective, another fusion.
    assert by.loc["learned_fusion", "model_loss"] == by.loc["crossover", "model_loss"]
    on_disk = pd.read_csv(tmp_path / "results.csv")
    assert on_disk["method"].tolist() == list(METHODS) * 2

    plan = json.loads((tmp_path / "selection.json").read_text())["plan"]
    assert plan["last"]["epochs"] == [12]
    assert len(plan["uniform_soup"]["epochs"]) == 5
    assert plan["greedy_soup"]["epochs"][0] == plan["best_single"]["epochs"][0]
    spots = plan["crossover"]["spots"]
    assert plan["group_window_soup"]["members"] == window_members(spots, 1, [2, 4, 6, 10, 12])
    assert {u: m[0] for u, m in plan["group_greedy_soup"]["members"].items()} == spots
    weights = plan["learned_fusion"]["fusion_weights"]
    assert set(weights) == {m for m in plan_modules()} and min(weights.values()) >= 0
    for task, fit in plan["learned_fusion"]["fit"].items():
        assert sum(fit["weights"].values()) == pytest.approx(1.0), task
        assert fit["val_loss_learned"] <= fit["val_loss_config_fusion"] + 1e-7, task

    # The per-row scores average to the table's metrics, and every method has its interval.
    values, ids = load_row_scores(tmp_path / "row_scores.npz")
    assert ids["holdout"] == list(holdout.ids) and ids["test"] == [data.ids[i] for i in data.splits["test"]]
    for split in ("test", "holdout"):
        row = results[(results["split"] == split) & (results["method"] == "group_greedy_soup")].iloc[0]
        for metric in ("emotion_accuracy", "bentham_mae"):
            assert np.nanmean(values[split]["group_greedy_soup"][metric]) == pytest.approx(row[metric])
    intervals = pd.read_csv(tmp_path / "intervals.csv")
    assert len(intervals) == 2 * len(METHODS) * 4
    best = intervals[intervals["method"] == "best_single"]
    assert (best["diff"] == 0).all() and best["mcnemar_p"].isna().all()
    acc = intervals[(intervals["metric"] == "emotion_accuracy") & (intervals["method"] != "best_single")]
    assert acc["mcnemar_p"].between(0, 1).all()
    assert (intervals["ci_low"] <= intervals["value"] + 1e-12).all()
    assert (intervals["value"] <= intervals["ci_high"] + 1e-12).all()


def plan_modules() -> set[str]:
    """Every module that predicts a task: the ones a fusion weighs."""
    from redheart_tune.model.groups import MODULE_TASK

    return {m for m, t in MODULE_TASK.items() if t is not None}


def test_a_group_soup_of_one_checkpoint_scores_as_the_crossover(experiment, tmp_path):
    """soup_window=0 makes the group window soup one checkpoint per unit: the crossover itself."""
    path, data = experiment
    cfg = load_config(None, ["analysis.soup_window=0", "analysis.learned_fusion=false"])
    with pytest.warns(IncompleteCheckpointWarning):
        results = evaluate_all(path, tmp_path, data=data, holdout=fake_holdout(), cfg=cfg)
    assert "learned_fusion" not in set(results["method"])
    by = results.set_index(["split", "method"]).drop(columns="members")
    for split in ("test", "holdout"):
        pd.testing.assert_series_equal(
            by.loc[(split, "group_window_soup")], by.loc[(split, "crossover")], check_names=False
        )
    with pytest.warns(IncompleteCheckpointWarning):
        run = load_training_run(path)
    plan = json.loads((tmp_path / "selection.json").read_text())["plan"]
    (soup,) = iter_models(run, plan["group_window_soup"])
    (cross,) = iter_models(run, plan["crossover"])
    for k, v in cross.state_dict().items():
        assert torch.equal(soup.state_dict()[k], v), k


@pytest.fixture()
def chosen(experiment):
    """What selection starts from: the run, the settings, the validation view and the sweet spots."""
    path, data = experiment
    with pytest.warns(IncompleteCheckpointWarning):
        run = load_training_run(path)
    return run, settings(data), val_only(data), select_sweet_spots(run.checkpoint_table)


def test_group_greedy_soup_keeps_what_lowers_each_units_recomputed_loss(chosen):
    from redheart_tune.engine.validation import validate

    run, s, view, spots = chosen
    members, record = group_greedy_members(run, spots, view, s)
    soup, _ = build_group_soup(members, run.complete, run.meta)
    # The unit loss is training's own: validate()'s module losses, averaged over the unit's modules.
    single = model_for_state(run, load_model_state(run.complete[2]))
    measured = validate(
        single, view, "val", tasks=s.tasks, task_weights=s.task_weights, fusion_weights={}, device=s.device
    ).module_loss
    rejected = 0
    for unit in selection_units():
        kept = members[unit.name]
        assert kept[0] == spots[unit.name] and len(set(kept)) == len(kept)
        tried = record[unit.name]["val_loss_with"]
        assert set(tried) == {str(e) for e in run.complete}  # every checkpoint was tried
        # The sweet spot first, then the unit's own recorded validation loss, lowest first (no penalty).
        order = record[unit.name]["order"]
        recorded = unit_scores(run.checkpoint_table, unit).set_index("epoch")["unit_loss"]
        assert order[0] == spots[unit.name] and list(recorded[order[1:]]) == sorted(recorded[order[1:]])
        # Replaying the rule on the recorded losses keeps exactly the members chosen.
        best, replay = tried[str(order[0])], [order[0]]
        for epoch in order[1:]:
            if tried[str(epoch)] <= best:
                replay.append(epoch)
                best = tried[str(epoch)]
        assert replay == kept and record[unit.name]["val_loss"] == best
        rejected += len(order) - len(kept)
        # The soup that was chosen has the loss recorded for it, recomputed here from its weights.
        assert unit_val_loss(soup, unit, view, s) == pytest.approx(record[unit.name]["val_loss"], rel=1e-6)
        expected = np.mean([measured[m] for m in unit.modules])
        assert unit_val_loss(single, unit, view, s) == pytest.approx(expected, rel=1e-5)
    assert any(len(m) > 1 for m in members.values())  # some unit did keep a second checkpoint here
    assert rejected > 0  # ...and some checkpoint raised a unit's loss and was left out


def test_learned_fusion_is_deterministic_and_no_worse_than_the_mean_on_validation(chosen):
    run, s, view, spots = chosen
    model, _ = build_crossover(spots, run.complete, run.meta)
    outputs, _ = predict_modules(model, view, "val", s)
    first, fit = learn_fusion_weights(outputs, view, s)
    again, _ = learn_fusion_weights(outputs, view, s)
    assert first == again
    assert set(fit) == set(s.tasks)
    for f in fit.values():
        assert sum(f["weights"].values()) == pytest.approx(1.0) and min(f["weights"].values()) >= 0
        assert f["val_loss_learned"] <= f["val_loss_config_fusion"] + 1e-7
    assert any(f["val_loss_learned"] < f["val_loss_config_fusion"] - 1e-4 for f in fit.values())
    # The fused validation loss with these weights is the one the fit reports.
    fused = fuse(outputs, s.tasks, first)
    targets, masks = split_targets(view, "val")
    for task, f in fit.items():
        loss = fused_task_loss(fused[task], targets[task], masks[task], s.tasks[task])
        assert loss.item() == pytest.approx(f["val_loss_learned"], rel=1e-5)
    # The fit starts from the crossover's own fusion: a module the config switches off stays off, and
    # "before" is the loss of that configured fusion, not of the plain mean.
    off = next(m for m in outputs if MODULE_TASK.get(m) == "emotion")
    configured = dataclasses.replace(s, fusion_weights={off: 0.0})
    weights, fit = learn_fusion_weights(outputs, view, configured)
    assert weights[off] == 0.0 and off not in fit["emotion"]["weights"]
    mean = fuse(outputs, s.tasks, {off: 0.0})["emotion"]
    before = fused_task_loss(mean, targets["emotion"], masks["emotion"], s.tasks["emotion"])
    assert fit["emotion"]["val_loss_config_fusion"] == pytest.approx(before.item(), rel=1e-6)


def test_a_fusion_fit_that_ends_non_finite_keeps_its_start():
    from redheart_tune.data import task_specs

    spec = task_specs("vader")["emotion"]
    gen = torch.Generator().manual_seed(0)
    preds = torch.softmax(torch.randn(3, 50, 3, dtype=torch.float64, generator=gen), -1)
    target = torch.softmax(torch.randn(50, 3, dtype=torch.float64, generator=gen), -1)
    rows = torch.ones(50, dtype=torch.bool)
    start = torch.tensor([1.0, 1.0, 2.0])
    w, before, after = fit_simplex_weights(preds, target, rows, spec, start)
    assert math.isfinite(after) and after < before and w.tolist() != pytest.approx([0.25, 0.25, 0.5])
    preds[1, 7] = float("nan")  # one broken prediction: the loss, and any fit, is NaN
    w, before, after = fit_simplex_weights(preds, target, rows, spec, start)
    assert w.tolist() == pytest.approx([0.25, 0.25, 0.5]) and math.isnan(after)


def test_evaluate_refuses_other_data_and_wrong_seed(experiment, tmp_path):
    path, _ = experiment
    with (
        pytest.warns(IncompleteCheckpointWarning),
        pytest.raises(EvaluationError, match="trained on data split"),
    ):
        evaluate_all(path, tmp_path, data=fake_data(seed=1), holdout=None)
    with pytest.warns(IncompleteCheckpointWarning), pytest.raises(EvaluationError, match="seed 0, not 3"):
        evaluate_all(path, tmp_path, seed=3, data=fake_data(), holdout=None)


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

    # 3. Every pass selection makes (soups, group soups, learned fusion) is over "val" of the view.
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


def test_no_selection_reads_the_held_out_set(experiment, tmp_path, monkeypatch):
    """evaluate_all is given the second held-out set; selection never reads a row of it (a spy on every
    pass while select_methods runs), and scrambling it changes no choice and no test score."""
    path, data = experiment
    holdout = fake_holdout()
    held_ids = set(holdout.ids)
    passes: list[tuple[str, str, tuple]] = []
    phase = ["evaluate"]
    real_batches, real_select = evaluate_module.iterate_batches, pipeline_module.select_methods

    def spy(d, split, *a, **kw):
        passes.append((phase[0], split, d.ids))
        return real_batches(d, split, *a, **kw)

    def selecting(*a, **kw):
        phase[0] = "select"
        try:
            return real_select(*a, **kw)
        finally:
            phase[0] = "evaluate"

    monkeypatch.setattr(evaluate_module, "iterate_batches", spy)
    monkeypatch.setattr(pipeline_module, "select_methods", selecting)
    with pytest.warns(IncompleteCheckpointWarning):
        results = evaluate_all(path, tmp_path / "a", data=data, holdout=holdout)
    monkeypatch.undo()
    selection = [(split, ids) for where, split, ids in passes if where == "select"]
    assert selection and all(split == "val" and not held_ids & set(ids) for split, ids in selection)
    assert any(split == "holdout" for where, split, _ in passes if where == "evaluate")  # it was scored

    with pytest.warns(IncompleteCheckpointWarning):
        again = evaluate_all(path, tmp_path / "b", data=data, holdout=_scramble_rows(holdout, "holdout"))
    plans = [json.loads((tmp_path / d / "selection.json").read_text())["plan"] for d in ("a", "b")]
    assert plans[0] == plans[1]
    test = [r[r["split"] == "test"].reset_index(drop=True) for r in (results, again)]
    pd.testing.assert_frame_equal(test[0], test[1])
    assert not results[results["split"] == "holdout"]["fused_loss"].equals(
        again[again["split"] == "holdout"]["fused_loss"]
    )


def test_a_held_out_set_that_overlaps_the_data_is_refused(experiment, tmp_path):
    import dataclasses

    path, data = experiment
    overlapping = dataclasses.replace(fake_holdout(), ids=("row3", *fake_holdout().ids[1:]))
    with pytest.warns(IncompleteCheckpointWarning), pytest.raises(EvaluationError, match="shares 1 record"):
        evaluate_all(path, tmp_path, data=data, holdout=overlapping)


def _scramble_test_rows(data):
    return _scramble_rows(data, "test")


def _scramble_rows(data, split):
    import dataclasses

    rng = np.random.default_rng(123)
    rows = data.splits[split]
    targets = {t: v.copy() for t, v in data.targets.items()}
    for v in targets.values():
        v[rows] = rng.permutation(v[rows]) if v.ndim == 1 else rng.random(v[rows].shape).astype(v.dtype)
    pooled = data.pooled.copy()
    pooled[rows] = rng.standard_normal(pooled[rows].shape).astype(pooled.dtype)
    return dataclasses.replace(data, targets=targets, pooled=pooled)


def test_fake_metrics_match_what_training_reports():
    """The helpers' metrics.json carries every key analysis reads from a real one (see redheart_tune/tune/trainable.py)."""
    m = fake_metrics(2, default_targets())
    assert {"train", "val", "grad_stats", "weight_stats", "activation_stats"} <= set(m)
    assert {"module_loss", "module_metric", "task_metric"} <= set(m["val"])
    assert {"epoch", "config", "seed", "data_fingerprint", "tasks", "input_dim"} <= set(fake_meta(2))
