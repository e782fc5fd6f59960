"""The step's speed knobs change nothing numerically, and its GPU costs, counted on a CPU, stay down.

The micro-batch setting (``optim.micro_batch``) decides how many rows one forward and
backward pass takes; the loss weighs every row as its own micro-batch of
``batch_size`` rows would, so the gradient is the accumulated one whatever it is.
The counters (``benchmarks/step_counters.py``) are how the step is steered without a
GPU: forward calls per unit, kernel-launching operators and host syncs per step.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.step_counters import count_step
from redheart_tune.config import ConfigError, cache_dir, load_config
from redheart_tune.data import iterate_batches, prepare_data
from redheart_tune.engine.loop import build_training
from redheart_tune.engine.memory import Window, format_plan, train_step
from tests.conftest import REPO, first_gradients


def smoke(data_cache, *overrides: str):
    return load_config(REPO / "configs" / "smoke.yaml", [f"data.cache_dir={data_cache}", *overrides])


@pytest.fixture(scope="module")
def data(data_cache):
    cfg = smoke(data_cache)
    return prepare_data(cfg.data, cache_dir(cfg), show_progress=False)


def _gradients(cfg, data) -> tuple[dict[str, torch.Tensor], object]:
    """Every parameter's gradient at the first optimizer step (captured as each unit steps)."""
    state = build_training(cfg, data, 1e-3, 1, torch.device("cpu"))
    batches = iterate_batches(
        data, "train", cfg.optim.batch_size, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    window = [next(batches) for _ in range(cfg.optim.grad_accum)]
    with first_gradients(state) as grads:
        result = train_step(state, Window(epoch=1, step=1, first_batch=0, batches=window))
    return grads, (state, result)


@pytest.mark.parametrize("micro_batch", [8, 16])
def test_one_pass_gives_the_gradient_of_the_accumulated_micro_batches(data_cache, data, micro_batch):
    base = [
        "model.dropout=0",
        "optim.batch_size=4",
        "optim.grad_accum=4",
        "optim.grad_clip=0",
        "memory.strategy=resident",
    ]
    accumulated, (_, ra) = _gradients(smoke(data_cache, *base, "optim.micro_batch=4"), data)
    joined, (state, rb) = _gradients(smoke(data_cache, *base, f"optim.micro_batch={micro_batch}"), data)
    assert {state.placement.plan.pass_batches(u) for u in state.optimizers} == {micro_batch // 4}
    assert accumulated.keys() == joined.keys() and len(accumulated) > 50
    for name, g in accumulated.items():
        torch.testing.assert_close(joined[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # The reported per-micro-batch losses are the same too (they feed the epoch's loss).
    assert ra.module_losses.shape == rb.module_losses.shape == (4, ra.module_losses.shape[1])
    torch.testing.assert_close(
        torch.from_numpy(rb.module_losses), torch.from_numpy(ra.module_losses), rtol=1e-6, atol=1e-7
    )
    assert (ra.correct, ra.counted) == (rb.correct, rb.counted)


def test_a_micro_batch_must_be_a_multiple_of_the_batch_size(data_cache):
    with pytest.raises(ConfigError, match="optim.micro_batch"):
        smoke(data_cache, "optim.batch_size=4", "optim.grad_accum=4", "optim.micro_batch=6")
    with pytest.raises(ConfigError, match="optim.micro_batch"):
        smoke(data_cache, "optim.batch_size=4", "optim.grad_accum=4", "optim.micro_batch=32")


def test_the_plan_gives_each_unit_the_largest_pass_its_turn_fits(data_cache, data):
    """With room, every unit takes the whole window in one pass; under a tight byte budget the big units
    take smaller passes, group_b checkpointed where that buys a larger pass, and every turn still fits."""
    base = ["model.preset=mid", "optim.batch_size=4", "optim.grad_accum=16", "data.max_tokens=32"]
    roomy = build_training(
        smoke(data_cache, *base, "memory.strategy=resident"), data, 1e-3, 1, torch.device("cpu")
    )
    assert {roomy.placement.plan.pass_batches(u) for u in roomy.optimizers} == {16}
    assert not any(u.checkpoint for u in roomy.placement.plan.units)
    cfg = smoke(data_cache, *base, "memory.strategy=stream", "memory.gpu_budget_gb=0.5")
    plan = build_training(cfg, data, 1e-3, 1, torch.device("cpu")).placement.plan
    passes = {u.name: u.pass_batches for u in plan.units}
    assert max(passes.values()) == 16 and min(passes.values()) < 16, format_plan(plan)
    assert all(u.turn_peak <= plan.limit_bytes for u in plan.units), format_plan(plan)
    assert plan.unit("group_b").checkpoint and plan.unit("group_b").pass_batches > 1, format_plan(plan)


def test_checkpointing_group_b_changes_no_number(data_cache, data):
    """The same weights, bit for bit, with group_b's activations checkpointed (its dropout recomputed
    with the same random numbers) as without."""
    base = [
        "model.preset=mid",
        "optim.batch_size=4",
        "optim.grad_accum=4",
        "data.max_tokens=32",
        "model.dropout=0.1",
    ]
    plain = build_training(
        smoke(data_cache, *base, "memory.strategy=resident"), data, 1e-3, 1, torch.device("cpu")
    )
    ckpt = build_training(
        smoke(data_cache, *base, "memory.strategy=resident"), data, 1e-3, 1, torch.device("cpu")
    )
    units = tuple(dataclasses.replace(u, checkpoint=u.name == "group_b") for u in ckpt.placement.plan.units)
    ckpt.placement.plan = dataclasses.replace(ckpt.placement.plan, units=units)
    before = {k: v.clone() for k, v in plain.model.state_dict().items()}
    for state in (plain, ckpt):
        batches = iterate_batches(data, "train", 4, shuffle=True, generator=torch.Generator().manual_seed(5))
        for step in range(2):
            window = [next(batches) for _ in range(4)]
            train_step(state, Window(epoch=1, step=step + 1, first_batch=4 * step, batches=window))
    a, b = plain.model.state_dict(), ckpt.model.state_dict()
    assert not torch.equal(a["neural_emotion.trunk.0.weight"], before["neural_emotion.trunk.0.weight"])
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("preset", ["tiny"])  # mid: python -m benchmarks.step_counters (minutes on 2 cores)
def test_counters_one_forward_per_unit_no_host_sync_and_far_fewer_launches(preset):
    """Per optimizer step of 16 micro-batches: the whole window in one pass per unit launches at
    least 8x fewer operators than 16 passes (on a CPU an RNN unrolls per time step, which a GPU's
    cuDNN does not, so this is the lower bound), and nothing in forward, loss or backward makes the
    host wait for the device."""
    before = count_step(preset, strategy="resident", overrides=("optim.micro_batch=4",))
    after = count_step(preset, strategy="resident")
    assert before.max_forward_per_unit == 16 and before.backward == 16 * len(before.forward)
    assert after.max_forward_per_unit == 1 and after.backward == len(after.forward)
    assert after.syncs == {} and before.syncs == {}, (before.syncs, after.syncs)
    assert before.ops >= 8 * after.ops, (before.ops, after.ops)
    assert after.optimizer_steps == len(after.forward)  # one AdamW step per unit
    # fused AdamW: per parameter group one update kernel and the step counters' increment (a
    # foreach or per-tensor AdamW launches a dozen operators per tensor list, or per tensor)
    assert after.optimizer_ops <= 4 * after.optimizer_steps, after.optimizer_ops
    streamed = count_step(preset, strategy="stream", budget_gb={"tiny": 0.03, "mid": 0.6}[preset])
    assert streamed.syncs == {} and streamed.moved_bytes > 0
    assert streamed.max_forward_per_unit <= 4
