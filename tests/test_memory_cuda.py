"""The memory component on a real GPU (skipped without one): `pytest -m cuda` on a GPU machine.

The CPU tests prove the arithmetic and the moves bit for bit; these exercise what a
CPU cannot: pinned buffers, the side stream and its events, the enforced memory
fraction, autocast with bf16 and fp16 plus the scaler, evaluation unit by unit.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.synthetic import synthetic_data
from tests.conftest import REPO
from tune.config import load_config
from tune.data import iterate_batches
from tune.loop import build_training, train_epoch, validate_state
from tune.memory import GiB, Window, configure_allocator, train_step, trial_budget

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICE = torch.device("cuda", 0)


@pytest.fixture(scope="module", autouse=True)
def allocator():
    configure_allocator()
    yield
    torch.cuda.set_per_process_memory_fraction(1.0, DEVICE)


def cfg(*overrides: str):
    return load_config(
        REPO / "configs" / "smoke.yaml",
        ["optim.batch_size=8", "optim.grad_accum=2", "model.dropout=0.1", "data.max_tokens=32", *overrides],
    )


def context_plus(gib: float) -> float:
    """A budget (GiB) of the CUDA context this process measures plus ``gib`` for tensors."""
    probe = trial_budget(cfg(), DEVICE, 1.0)
    return round((probe.context_bytes + gib * GiB) / GiB, 3)


def _steps(c, data, steps=3, share=1.0):
    state = build_training(c, data, 1e-3, 1, DEVICE, budget=trial_budget(c, DEVICE, share))
    batches = iterate_batches(data, "train", 8, shuffle=True, generator=torch.Generator().manual_seed(7))
    for k in range(steps):
        train_step(state, Window(1, k + 1, 2 * k, [next(batches), next(batches)]))
        state.schedule.step()
    state.placement.synchronize()
    return state


@pytest.mark.parametrize(("preset", "precision"), [("tiny", "bf16"), ("mid", "bf16"), ("tiny", "fp16")])
def test_stream_matches_resident_on_the_gpu(preset, precision):
    data = synthetic_data(64, 32)
    base = [f"model.preset={preset}", f"optim.precision={precision}"]
    resident = _steps(cfg(*base, "memory.strategy=resident"), data)
    budget = context_plus(0.5 if preset == "mid" else 0.03)
    streamed = _steps(cfg(*base, "memory.strategy=stream", f"memory.gpu_budget_gb={budget}"), data)
    assert streamed.placement.plan.streamed
    for slot in streamed.placement.slots.values():
        if slot.home is not None:
            assert slot.home.is_pinned()
    sa, sb = resident.model.state_dict(), streamed.model.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k].cpu(), sb[k].cpu(), rtol=1e-3, atol=1e-5, msg=k)
    if precision == "fp16":
        assert resident.scaler.is_enabled() and resident.scaler.get_scale() == streamed.scaler.get_scale()


def test_the_budget_is_enforced_and_held():
    """mid under a budget of the context + 0.5 GiB: the allocator is capped, and streamed training
    stays inside it."""
    data = synthetic_data(128, 32)
    c = cfg("model.preset=mid", "memory.strategy=stream", f"memory.gpu_budget_gb={context_plus(0.5)}")
    budget = trial_budget(c, DEVICE, 1.0)
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    torch.cuda.empty_cache()
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(int(0.6 * GiB), dtype=torch.uint8, device=DEVICE)
    torch.cuda.empty_cache()
    state = build_training(c, data, 1e-3, 1, DEVICE, budget=budget)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    tr = train_epoch(state, data, 1)
    assert torch.isfinite(torch.tensor(tr.loss))
    # the placement keeps the peaks (it resets the allocator's counters at every unit turn)
    peak = state.placement.take_peaks()["reserved"] + state.placement.budget.context_bytes
    print(
        f"mid, {budget.bytes / GiB:.2f} GiB budget on a {total / GiB:.0f} GiB card: peak reserved + context "
        f"{peak / GiB:.3f} GiB; streamed {state.placement.plan.streamed}"
    )
    assert state.placement.plan.streamed
    assert peak <= budget.bytes
    assert tr.memory_moves and all(m["seconds"] is not None for m in tr.memory_moves)


def test_validation_and_evaluation_stream_on_the_gpu():
    pytest.importorskip("ray", reason="the analysis package reads Tune experiments")
    from analysis.evaluate import EvalSettings, predict

    data = synthetic_data(64, 32, val_rows=48)
    c = cfg("model.preset=mid", "memory.strategy=stream", f"memory.gpu_budget_gb={context_plus(0.5)}")
    state = build_training(c, data, 1e-3, 1, DEVICE, budget=trial_budget(c, DEVICE, 1.0))
    val = validate_state(state, data, "val", collect_activations=True)
    state.placement.synchronize()
    cpu_model = state.model
    for p in cpu_model.parameters():
        p.data = p.data.cpu()
    settings = dict(tasks=data.tasks, task_weights={}, fusion_weights={}, batch_size=16)
    on_gpu = predict(cpu_model, data, "val", EvalSettings(device=DEVICE, **settings))
    on_cpu = predict(cpu_model, data, "val", EvalSettings(device=torch.device("cpu"), **settings))
    assert all(
        p.device.type == "cpu" for p in cpu_model.parameters()
    )  # the mover left the model where it was
    for task in on_cpu.fused:
        torch.testing.assert_close(on_gpu.fused[task], on_cpu.fused[task], rtol=1e-3, atol=1e-4)
    assert val.activations and len(val.activations) == 18
