"""The model family: gradient coverage, sizes, the dependency rule, losses, group state round-trip."""

from __future__ import annotations

import math
import time

import pytest
import torch

from redheart_tune.model.family import (
    RedHeart,
    build_model,
    fuse,
    group_state_dict,
    param_counts,
)
from redheart_tune.model.groups import GROUPS, LINKS, MODULE_TASK, MODULES, param_prefix_owner
from redheart_tune.model.losses import metric_sums, module_losses, row_losses, task_loss, total_loss
from redheart_tune.model.presets import TARGETS_730M, TOTAL_730M, ModelConfig
from redheart_tune.model.report import format_params_report, params_report
from redheart_tune.model.tasks import TaskSpec

VADER_TASKS = {
    "emotion": TaskSpec("emotion", "soft_classification", ("negative", "neutral", "positive")),
    "bentham": TaskSpec("bentham", "regression", ("neg", "neu", "pos")),
    "regret": TaskSpec("regret", "regression", ("regret",)),
    "surd": TaskSpec("surd", "classification", ("a", "b", "c", "d")),
}
REDHEART_TASKS = {
    "emotion": TaskSpec(
        "emotion", "soft_classification", ("Joy", "Trust", "Fear", "Surprise", "Sadness", "Disgust", "Anger")
    ),
    "bentham": TaskSpec("bentham", "regression", ("intensity", "duration", "certainty", "propinquity")),
    "regret": TaskSpec("regret", "regression", ("regret_factor",)),
    "surd": TaskSpec("surd", "regression", ("selection", "uncertainty", "risk", "decision")),
}
E = 384


def make_batch(tasks: dict[str, TaskSpec], B: int = 8, T: int = 12, seed: int = 0):
    """Encoder-shaped inputs with right-padded masks of varied lengths, and targets per TaskSpec."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, T, E, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[-1] = 1, T  # the extremes: one real token, no padding
    mask = torch.arange(T) < lengths[:, None]  # (B, T)
    tokens = tokens * mask[..., None]  # the encoder gives nothing real past the end
    pooled = (tokens.sum(1) / lengths[:, None]).contiguous()  # (B, E) mean pooling, as MiniLM does
    targets = {}
    for name, spec in tasks.items():
        if spec.kind == "soft_classification":
            targets[name] = torch.softmax(2 * torch.randn(B, spec.dim, generator=g), -1)
        elif spec.kind == "classification":
            targets[name] = torch.randint(0, spec.dim, (B,), generator=g)
        else:
            targets[name] = torch.rand(B, spec.dim, generator=g)  # scores in [0, 1]
    target_mask = {name: torch.ones(B, dtype=torch.bool) for name in tasks}
    return tokens, mask, pooled, targets, target_mask


def tiny(tasks: dict[str, TaskSpec], seed: int = 0, dropout: float = 0.1) -> RedHeart:
    torch.manual_seed(seed)
    return build_model(ModelConfig(preset="tiny", dropout=dropout), tasks, E)


def linked_closure(module: str) -> set[str]:
    """The module and every module it reads, transitively, through LINKS."""
    seen, todo = {module}, [module]
    while todo:
        for src in LINKS.get(todo.pop(), ()):
            if src not in seen:
                seen.add(src)
                todo.append(src)
    return seen


# 1. gradient coverage -------------------------------------------------------


@pytest.mark.parametrize("tasks", [VADER_TASKS, REDHEART_TASKS], ids=["vader", "redheart"])
def test_one_step_trains_every_parameter(tasks):
    model = tiny(tasks)
    model.train()
    tokens, mask, pooled, targets, target_mask = make_batch(tasks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    outputs = model(tokens, mask, pooled)
    assert set(outputs) == {m for m, t in MODULE_TASK.items() if t is not None}
    for m, y in outputs.items():
        assert y.shape == (8, tasks[MODULE_TASK[m]].dim), m
    losses = module_losses(outputs, targets, target_mask, tasks)
    loss = total_loss(losses, {"emotion": 1.0, "bentham": 1.0, "regret": 1.0, "surd": 1.0})
    assert torch.isfinite(loss)
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not bool((p.grad != 0).any())]
    assert not dead, f"parameters with no gradient: {dead}"
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p.grad).all())]
    assert not bad, f"non-finite gradients: {bad}"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p)]
    assert not unchanged, f"parameters the step did not change: {unchanged}"


# 2. sizes --------------------------------------------------------------------


def test_redheart_730m_sizes_on_meta():
    start = time.perf_counter()
    with torch.device("meta"):
        model = build_model(ModelConfig(preset="redheart-730m"), REDHEART_TASKS, E)
    assert time.perf_counter() - start < 10
    counts = param_counts(model)
    for modules, target in TARGETS_730M.items():
        n = sum(counts[m] for m in modules)
        assert abs(n - target) <= 0.03 * target, f"{'+'.join(modules)}: {n:,} vs {target:,}"
    lo, hi = TOTAL_730M
    assert lo <= sum(counts.values()) <= hi


def test_tiny_size_and_report():
    report = params_report(ModelConfig(preset="tiny"), REDHEART_TASKS, E)
    assert 1_000_000 <= report["total"] <= 3_000_000
    assert "targets" not in report
    text = format_params_report(report)
    assert "group_b" in text and "bf16_autocast" in text
    big = params_report(ModelConfig(preset="redheart-730m"), REDHEART_TASKS, E)
    assert big["memory"]["fp32"]["total"] == 16 * big["total"]
    assert not big["memory"]["fp32"]["fits"]  # 730M cannot keep AdamW training state on an 8 GB card
    assert len(big["targets"]) == len(TARGETS_730M)
    assert "dsp+kalman" in format_params_report(big)


def test_model_is_deterministic_given_seed():
    a, b = tiny(REDHEART_TASKS, seed=3), tiny(REDHEART_TASKS, seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


# 3. the dependency rule and the module layout ------------------------------------


def test_modules_exist_and_state_dict_partitions_by_module():
    model = tiny(REDHEART_TASKS)
    keys = list(model.state_dict())
    owned = {m: [k for k in keys if param_prefix_owner(k) == m] for m in MODULES}  # raises on an unowned key
    for m in MODULES:
        sub = model.module(m)
        assert owned[m], f"{m} owns no tensors"
        assert sorted(owned[m]) == sorted(f"{m}.{k}" for k in sub.state_dict()), m
    assert sum(len(v) for v in owned.values()) == len(keys)
    with pytest.raises(KeyError):
        model.module("heads")


def test_each_module_reads_only_its_links():
    model = tiny(REDHEART_TASKS)
    model.eval()
    tokens, mask, pooled, _, _ = make_batch(REDHEART_TASKS, B=4, T=6)
    outputs = model(tokens, mask, pooled)
    names, params = zip(*model.named_parameters(), strict=True)
    for module, y in outputs.items():
        grads = torch.autograd.grad(y.sum(), params, retain_graph=True, allow_unused=True)
        reached = {
            param_prefix_owner(n)
            for n, g in zip(names, grads, strict=True)
            if g is not None and bool(g.any())
        }
        allowed = linked_closure(module)
        assert reached <= allowed, f"{module} reads {sorted(reached - allowed)} outside its links"
        assert module in reached
        # The declared links are real reads, not just allowed ones.
        assert set(LINKS.get(module, ())) <= reached, f"{module} does not read all of {LINKS.get(module)}"


# 4. losses, metrics, fusion ------------------------------------------------------


def test_loss_shapes_are_asserted():
    reg = REDHEART_TASKS["regret"]
    with pytest.raises(ValueError):
        row_losses(torch.zeros(4, 1), torch.zeros(4), reg)  # (B, 1) vs (B,): the original's bug
    with pytest.raises(ValueError):
        row_losses(torch.zeros(4), torch.zeros(4, 1), reg)
    cls = VADER_TASKS["surd"]
    with pytest.raises(ValueError):
        row_losses(torch.zeros(4, 4), torch.zeros(4, 1, dtype=torch.long), cls)
    soft = REDHEART_TASKS["emotion"]
    with pytest.raises(ValueError):
        row_losses(torch.zeros(4, 7), torch.zeros(4, 3), soft)


@pytest.mark.parametrize("task", ["regret", "surd", "emotion"])
def test_masked_rows_are_ignored(task):
    spec = {**REDHEART_TASKS, "surd": VADER_TASKS["surd"]}[task]
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(6, spec.dim, generator=g, requires_grad=True)
    if spec.kind == "classification":
        target = torch.randint(0, spec.dim, (6,), generator=g)
        junk = torch.full((2,), -1)  # an invalid class index would crash cross-entropy if it got there
    elif spec.kind == "soft_classification":
        target = torch.softmax(torch.randn(6, spec.dim, generator=g), -1)
        junk = torch.full((2, spec.dim), float("nan"))
    else:
        target = torch.rand(6, spec.dim, generator=g)
        junk = torch.full((2, spec.dim), float("nan"))
    mask = torch.tensor([True, False, True, True, False, True])
    target = target.clone()
    target[~mask] = junk
    loss = task_loss(pred, target, mask, spec)
    expected = row_losses(pred[mask], target[mask], spec).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad[~mask] == 0).all()
    none = task_loss(pred, target, torch.zeros(6, dtype=torch.bool), spec)
    assert none.item() == 0.0
    s, n = metric_sums(pred.detach(), target, mask, spec)
    assert n == 4 and math.isfinite(s)


def test_non_finite_loss_is_not_hidden():
    spec = REDHEART_TASKS["bentham"]
    pred = torch.full((3, 4), float("nan"))
    loss = task_loss(pred, torch.rand(3, 4), torch.ones(3, dtype=torch.bool), spec)
    assert torch.isnan(loss)


def test_soft_label_cross_entropy_minimum_is_target_entropy():
    spec = REDHEART_TASKS["emotion"]
    target = torch.softmax(torch.randn(5, 7, generator=torch.Generator().manual_seed(2)), -1)
    entropy = -(target * target.log()).sum(-1)
    logits = target.log().requires_grad_(True)  # the optimum: softmax(logits) == target
    loss = row_losses(logits, target, spec)
    torch.testing.assert_close(loss, entropy)
    loss.sum().backward()
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits), atol=1e-6, rtol=0)
    assert (row_losses(torch.randn(5, 7), target, spec) > entropy).all()
    # A one-hot target's minimum is 0: no floor from softmax-then-cross-entropy.
    onehot = torch.eye(7)[:5]
    assert row_losses(100 * onehot, onehot, spec).max() < 1e-6


def test_total_loss_and_backbone_loss():
    tasks = REDHEART_TASKS
    model = tiny(tasks)
    tokens, mask, pooled, targets, target_mask = make_batch(tasks)
    losses = module_losses(model(tokens, mask, pooled), targets, target_mask, tasks)
    heads = [losses[f"heads.{t}"] for t in tasks]
    torch.testing.assert_close(losses["backbone"], torch.stack(heads).mean())
    predicting = [m for m in losses if m != "backbone"]
    torch.testing.assert_close(total_loss(losses, {}), torch.stack([losses[m] for m in predicting]).mean())
    only_regret = total_loss(losses, {"emotion": 0.0, "bentham": 0.0, "regret": 1.0, "surd": 0.0})
    regret_modules = [m for m in predicting if MODULE_TASK[m] == "regret"]
    torch.testing.assert_close(only_regret, torch.stack([losses[m] for m in regret_modules]).mean())


def test_metric_sums():
    cls = VADER_TASKS["surd"]
    pred = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]])
    assert metric_sums(pred, torch.tensor([0, 1, 3]), torch.ones(3, dtype=torch.bool), cls) == (2.0, 3)
    soft = VADER_TASKS["emotion"]
    target = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    assert metric_sums(
        torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]), target, torch.ones(2, dtype=torch.bool), soft
    ) == (
        1.0,
        2,
    )
    reg = REDHEART_TASKS["bentham"]
    s, n = metric_sums(torch.zeros(2, 4), torch.full((2, 4), 0.5), torch.tensor([True, False]), reg)
    assert (s, n) == (0.5, 1)


def test_fuse():
    tasks = VADER_TASKS
    model = tiny(tasks)
    tokens, mask, pooled, targets, target_mask = make_batch(tasks)
    with torch.no_grad():
        outputs = model(tokens, mask, pooled)
    fused = fuse(outputs, tasks, {"phase0": 3.0})
    for t, spec in tasks.items():
        if spec.is_classification:
            assert (fused[t] >= 0).all()
            torch.testing.assert_close(fused[t].sum(-1), torch.ones(8))
        s, n = metric_sums(fused[t], targets[t], target_mask[t], spec)
        assert n == 8 and math.isfinite(s)
    members = [m for m in outputs if MODULE_TASK[m] == "regret"]
    torch.testing.assert_close(fused["regret"], torch.stack([outputs[m] for m in members]).mean(0))
    # A zero weight removes a module from its task's fusion.
    solo = fuse(outputs, tasks, {m: 0.0 for m in members if m != "phase1"})
    torch.testing.assert_close(solo["regret"], outputs["phase1"])


# 5. group state round trip -------------------------------------------------------


def test_group_state_round_trip():
    tasks = REDHEART_TASKS
    source, target = tiny(tasks, seed=0).eval(), tiny(tasks, seed=1).eval()
    tokens, mask, pooled, _, _ = make_batch(tasks)
    with torch.no_grad():
        want = source(tokens, mask, pooled)
    for group, members in GROUPS.items():
        # one group's tensors into the whole model, as checkpoints are loaded: a strict load_state_dict
        target.load_state_dict({**target.state_dict(), **group_state_dict(source, group)}, strict=True)
        with torch.no_grad():
            got = target(tokens, mask, pooled)
        # A group's outputs depend on that group alone, so they match as soon as it is loaded.
        for m in members:
            if m in got:
                torch.testing.assert_close(got[m], want[m])
    with pytest.raises(KeyError):
        group_state_dict(source, "group_z")


def test_state_dict_keys_do_not_depend_on_dropout():
    """A checkpoint trained with dropout loads into a model built without it."""
    a, b = tiny(REDHEART_TASKS, dropout=0.1), tiny(REDHEART_TASKS, dropout=0.0)
    assert list(a.state_dict()) == list(b.state_dict())
