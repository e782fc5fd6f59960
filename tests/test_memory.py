"""The memory component: the plan, streamed training equal to resident training, the budget, the DSM."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from redheart_tune.config import cache_dir, load_config
from redheart_tune.data import iterate_batches, prepare_data, task_specs
from redheart_tune.engine.loop import build_training, choose_precision, train_epoch
from redheart_tune.engine.memory import (
    GiB,
    PlanError,
    SwapManager,
    Window,
    cpu_budget,
    format_plan,
    plan_for,
    planning_budget,
    train_step,
)
from redheart_tune.engine.memory.dsm import Candidate, swap_out_count
from redheart_tune.engine.memory.sizes import moment_window_bytes, shard_partition
from redheart_tune.engine.validation import validate_state
from redheart_tune.model.groups import GROUPS, NEVER_SWAPPED, selection_units
from redheart_tune.tune.resources import trial_device
from tests.conftest import REPO


def smoke(data_cache, *overrides: str):
    return load_config(REPO / "configs" / "smoke.yaml", [f"data.cache_dir={data_cache}", *overrides])


@pytest.fixture(scope="module")
def data(data_cache):
    cfg = smoke(data_cache)
    return prepare_data(cfg.data, cache_dir(cfg), show_progress=False)


# ---------------------------------------------------------------------------
# The plan


def test_730m_plan_fits_8_gib_with_backbone_and_heads_resident():
    cfg = load_config(REPO / "configs" / "redheart-730m.yaml")
    budget = planning_budget(cfg.memory)
    plan, sizes = plan_for(cfg, task_specs("redheart"), 384, device="cuda", budget=budget)
    assert budget.bytes == 8 * GiB and cfg.memory.target == 0.85
    assert plan.strategy == "stream"  # resident does not fit: 10.8 GiB of state alone
    assert plan.resident_peak > 8 * GiB
    assert plan.peak_bytes + plan.context_bytes <= 0.85 * 8 * GiB
    assert "group_a" in plan.resident  # the backbone and the four heads
    assert "group_b" in plan.streamed and plan.unit("group_b").moments == "sharded"
    assert sum(s.numel for s in sizes) == 723_976_474
    # each streamed unit's weights and moments move in and out once per step: 24 bytes per parameter
    streamed = sum(s.numel for s in sizes if s.name in plan.streamed)
    assert plan.transfer_bytes_per_step == 24 * streamed
    # copies beside a turn's compute: prefetched ones and copies home that drain beside the next turn
    assert any(plan.unit(u).prefetch_at for u in plan.streamed)
    assert any(plan.unit(u).drain_in for u in plan.streamed)
    undrained = dataclasses.replace(
        plan, units=tuple(dataclasses.replace(u, drain_in=None) for u in plan.units)
    )
    assert plan.waited_bytes_per_step < undrained.waited_bytes_per_step < plan.transfer_bytes_per_step
    serial = load_config(REPO / "configs" / "redheart-730m.yaml", ["memory.prefetch=false"])
    serial_plan, _ = plan_for(serial, task_specs("redheart"), 384, device="cuda", budget=budget)
    assert serial_plan.waited_bytes_per_step == serial_plan.transfer_bytes_per_step
    text = format_plan(plan)
    print(text)
    assert "moved per optimizer step" in text and "group_b" in text and "resident: group_a" in text
    assert "beside no turn's compute" in text


def test_params_prints_the_plan(tmp_path):
    import json

    from tests.test_cli import run_py

    done = run_py("params", str(REPO / "configs" / "redheart-730m.yaml"))
    assert done.returncode == 0, done.stderr
    assert "memory plan: strategy stream" in done.stdout and "resident: group_a" in done.stdout
    assert "moved per optimizer step" in done.stdout
    done = run_py("params", "--json", str(REPO / "configs" / "redheart-730m.yaml"), "memory.gpu_budget_gb=3")
    plan = json.loads(done.stdout)["memory_plan"]
    assert plan["fits"] is False and "optim.batch_size=2" in plan["error"]


def test_plan_refuses_what_cannot_fit_with_the_numbers_and_advice():
    cfg = load_config(REPO / "configs" / "redheart-730m.yaml", ["memory.gpu_budget_gb=3"])
    with pytest.raises(PlanError) as err:
        plan_for(cfg, task_specs("redheart"), 384, device="cuda", budget=planning_budget(cfg.memory))
    msg = str(err.value)
    assert "GiB" in msg and "optim.batch_size=2 optim.grad_accum=32" in msg


def test_resident_strategy_that_does_not_fit_is_refused():
    cfg = load_config(REPO / "configs" / "redheart-730m.yaml", ["memory.strategy=resident"])
    with pytest.raises(PlanError, match="memory.strategy=stream"):
        plan_for(cfg, task_specs("redheart"), 384, device="cuda", budget=planning_budget(cfg.memory))


def test_shards_never_split_a_tensor():
    assert shard_partition([4, 4, 4, 100, 1], shard_bytes=8 * 8) == [[0, 1], [2], [3], [4]]
    assert shard_partition([1, 2, 3], shard_bytes=10**9) == [[0, 1, 2]]
    # on the device at once: the shard stepping and the next one arriving
    assert moment_window_bytes([4, 4, 4, 100, 1], shard_bytes=8 * 8) == 8 * (4 + 100)
    assert moment_window_bytes([1, 2, 3], shard_bytes=10**9) == 8 * 6


# ---------------------------------------------------------------------------
# Streamed training gives the weights resident training gives


def _steps(cfg, data, steps=3):
    state = build_training(cfg, data, 1e-3, 2, torch.device("cpu"))
    batches = iterate_batches(
        data, "train", cfg.optim.batch_size, shuffle=True, generator=torch.Generator().manual_seed(7)
    )
    accum = cfg.optim.grad_accum
    for k in range(steps):
        window = [next(batches) for _ in range(accum)]
        train_step(state, Window(epoch=1, step=k + 1, first_batch=k * accum, batches=window))
        state.schedule.step()
    state.placement.synchronize()
    return state


def _assert_same_training(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for unit in a.optimizers:
        oa, ob = a.optimizers[unit].state_dict(), b.optimizers[unit].state_dict()
        assert oa["state"].keys() == ob["state"].keys() and oa["state"], unit
        for i, st in oa["state"].items():
            for key, value in st.items():
                assert torch.equal(value, ob["state"][i][key]), (unit, i, key)


@pytest.mark.parametrize(
    ("preset", "stream_overrides"),
    [
        (
            "tiny",
            ["memory.gpu_budget_gb=0.024"],
        ),  # six units stream: moments with them or sharded, prefetched
        ("tiny", ["memory.gpu_budget_gb=0.022", "memory.stream_moments=sharded", "memory.shard_mb=1"]),
        ("mid", ["memory.gpu_budget_gb=0.5", "memory.stream_moments=sharded", "memory.shard_mb=4"]),
    ],
)
def test_stream_equals_resident_bit_for_bit(data_cache, data, preset, stream_overrides):
    base = [f"model.preset={preset}", "optim.batch_size=8", "optim.grad_accum=2", "model.dropout=0.1"]
    resident = _steps(smoke(data_cache, *base, "memory.strategy=resident"), data)
    streamed = _steps(smoke(data_cache, *base, "memory.strategy=stream", *stream_overrides), data)
    plan = streamed.placement.plan
    assert plan.strategy == "stream" and len(plan.streamed) >= 2, format_plan(plan)
    modes = {plan.unit(u).moments for u in plan.streamed}
    assert modes == (
        {"sharded"} if "memory.stream_moments=sharded" in stream_overrides else {"with_unit", "sharded"}
    )
    assert any(plan.unit(u).prefetch_at for u in plan.streamed)  # some arrive during earlier turns
    moves, _ = streamed.placement.drain()
    assert {"stream_in", "stream_out"} <= {m["action"] for m in moves}
    _assert_same_training(resident, streamed)


def test_a_sharded_step_holds_at_most_two_moment_shards_on_the_device(data_cache, data, monkeypatch):
    """The plan budgets one moment shard stepping and the next arriving (``moment_window_bytes``): as a
    shard's buffers are allocated, only the previous shard's may still exist, never the one before it
    (the allocator would otherwise hold a third shard on a GPU, which the CPU's byte count cannot see)."""
    import sys
    import weakref

    from redheart_tune.engine.memory import sharded

    cfg = smoke(
        data_cache,
        "optim.batch_size=8",
        "optim.grad_accum=2",
        "memory.strategy=stream",
        "memory.gpu_budget_gb=0.022",
        "memory.stream_moments=sharded",
        "memory.shard_mb=1",
    )
    made: list[weakref.ref] = []
    live_at_fetch: list[int] = []
    empty = torch.empty

    def tracked(*args, **kwargs):
        t = empty(*args, **kwargs)
        if sys._getframe(1).f_globals.get("__name__") == sharded.__name__:
            live_at_fetch.append(sum(r() is not None for r in made))
            made.append(weakref.ref(t))
        return t

    monkeypatch.setattr(torch, "empty", tracked)
    _steps(cfg, data, steps=2)  # the first step creates the moments; the second fetches them
    fetches = len(live_at_fetch) // 2  # two moment buffers per shard, over the step's sharded units
    assert fetches >= 3, "too few shards for a third one to be held"
    assert max(live_at_fetch) <= 3, live_at_fetch  # the previous shard's two, and this shard's first


def test_dropout_is_on_and_seeded_per_unit(data_cache, data):
    """Two different seeds give different weights (dropout and init draw from the seed)."""
    base = ["optim.batch_size=8", "optim.grad_accum=2", "model.dropout=0.5", "memory.strategy=resident"]
    a = _steps(smoke(data_cache, *base), data, steps=1)
    b = _steps(smoke(data_cache, *base, "run.seed=1"), data, steps=1)
    assert not torch.equal(a.model.phase0.net[0].weight, b.model.phase0.net[0].weight)


# ---------------------------------------------------------------------------
# The budget, the records, the swap manager


def test_stream_under_a_byte_budget_never_exceeds_it(data_cache, data):
    cfg = smoke(data_cache, "memory.strategy=stream", "memory.gpu_budget_gb=0.024", "optim.batch_size=16")
    state = build_training(cfg, data, 1e-3, 2, torch.device("cpu"))
    whole = sum(p.numel() for p in state.model.parameters()) * 16  # weights, grads, AdamW moments
    budget = cpu_budget(cfg.memory).bytes
    assert whole > budget
    tr = train_epoch(state, data, 1)
    assert math.isfinite(tr.loss)
    peaks = [t["peak_bytes"] for t in tr.memory_trace]
    assert len(peaks) == len(selection_units()) * state.steps_per_epoch  # one per unit turn
    assert max(peaks) <= state.placement.plan.limit_bytes <= budget
    units_moved = {m["module"] for m in tr.memory_moves if m["action"] == "stream_in"}
    assert units_moved == set(state.placement.plan.streamed)
    for m in tr.memory_moves:
        assert m["bytes"] > 0 and m["seconds"] >= 0 and m["memory_after"] <= budget


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_units_copy_home_runs_beside_the_next_turn_and_is_counted(data_cache, data, monkeypatch, prefetch):
    """Where the plan has room (``drain_in``), a streamed unit's weights (and moments moved with it)
    stay on the device through the next turn, its copy home running beside that turn's compute; they
    are counted in that turn's use and let go at its end.  Without room, or with memory.prefetch off,
    nothing drains."""
    from redheart_tune.engine.memory.placement import Placement

    cfg = smoke(
        data_cache,
        "memory.strategy=stream",
        "memory.gpu_budget_gb=0.024",
        "optim.batch_size=16",
        f"memory.prefetch={str(prefetch).lower()}",
    )
    state = build_training(cfg, data, 1e-3, 1, torch.device("cpu"))
    plan, placement = state.placement.plan, state.placement
    drains = {u.drain_in: u for u in plan.units if u.drain_in}
    assert bool(drains) == prefetch, format_plan(plan)
    for turn, unit in drains.items():  # the next turn, and only a streamed unit's copy drains
        order = [u.name for u in plan.units]
        assert not unit.resident and order.index(turn) == order.index(unit.name) + 1

    draining_at_end: dict[str, list[int]] = {}
    end_turn = Placement.end_turn

    def record(self, unit):
        assert all(d.beside == unit for d in self._draining)  # planned beside the turn now ending
        draining_at_end[unit] = [d.nbytes for d in self._draining]
        end_turn(self, unit)

    monkeypatch.setattr(Placement, "end_turn", record)
    tr = train_epoch(state, data, 1)
    assert math.isfinite(tr.loss)
    sizes = {s.name: s for s in placement.sizes}
    for u in plan.units:
        expected = []
        if u.name in drains:
            d = drains[u.name]
            expected = [sizes[d.name].weights + (sizes[d.name].moments if d.moments == "with_unit" else 0)]
        assert draining_at_end[u.name] == expected, u.name
    assert placement._draining == [] and placement.accounted() == placement._on_device_bytes()
    peaks = {t["unit"]: t["peak_bytes"] for t in tr.memory_trace}
    for turn in drains:  # the turn's measured use holds the unit going home
        assert peaks[turn] >= draining_at_end[turn][0] + 4 * sizes[turn].numel
    assert max(peaks.values()) <= plan.limit_bytes


def test_swap_manager_rule():
    assert swap_out_count(0.86, 0.85) == 1 and swap_out_count(1.12, 0.85) == 2
    dsm = SwapManager(target=0.85, budget_bytes=1000)
    resident = [
        Candidate("group_a", NEVER_SWAPPED, 500),
        Candidate("group_b", 50, 300),
        Candidate("phase0", 10, 50),
        Candidate("advanced_emotion", 20, 100),
    ]
    assert dsm.to_swap_out(0.85, resident) == []
    assert dsm.to_swap_out(1.06, resident) == ["phase0", "advanced_emotion"]  # ascending priority, 21 % over
    assert "group_a" not in dsm.to_swap_out(1.5, resident)  # never the backbone's group
    swapped = {c.name: c for c in resident}
    assert dsm.to_bring_back(0.5, swapped) is None  # nothing swapped out yet
    dsm.swapped = ["advanced_emotion", "phase0"]
    assert dsm.to_bring_back(0.80, swapped) is None  # inside the band: nothing
    assert dsm.to_bring_back(0.70, swapped) == "phase0"  # most recent first
    dsm.swapped = ["group_b"]
    assert dsm.to_bring_back(0.70, swapped) is None  # 0.70 + 0.30 would pass the target


def test_swap_manager_acts_records_and_changes_nothing_numerically(data_cache, data):
    """A plan that believed too much fits: the swap manager swaps units out at run time (lowest
    priority first), every move is recorded, and the weights equal resident training's."""
    base = ["optim.batch_size=8", "optim.grad_accum=2"]
    resident = _steps(smoke(data_cache, *base, "memory.strategy=resident"), data, steps=4)
    cfg = smoke(data_cache, *base, "memory.strategy=stream", "memory.gpu_budget_gb=0.05")
    state = build_training(cfg, data, 1e-3, 2, torch.device("cpu"))
    assert not state.placement.plan.streamed  # the plan keeps everything
    state.placement.dsm = SwapManager(target=0.85, budget_bytes=int(0.025 * GiB))  # the card is smaller
    batches = iterate_batches(data, "train", 8, shuffle=True, generator=torch.Generator().manual_seed(7))
    for k in range(4):
        train_step(state, Window(1, k + 1, 2 * k, [next(batches), next(batches)]))
        state.schedule.step()
    moves, trace = state.placement.drain()
    swapped_out = [m["module"] for m in moves if m["action"] == "swap_out"]
    assert swapped_out[0] == "phase0"  # priority 10, the biggest of the lowest
    priorities = [state.placement.slots[u].priority for u in swapped_out]
    assert priorities == sorted(priorities) and "group_a" not in swapped_out
    assert state.placement.dsm.swapped == swapped_out
    assert set(swapped_out) <= set(state.placement.plan.streamed)
    assert all(
        m["bytes"] == 12 * state.placement.slots[m["module"]].numel
        for m in moves
        if m["action"] == "swap_out"
    )
    assert len(trace) == 4 * len(selection_units())
    _assert_same_training(resident, state)


def test_resume_under_stream_restores_the_swap_state_exactly(data_cache, data, tmp_path):
    from redheart_tune.engine.checkpoints import write_checkpoint
    from redheart_tune.tune.trainable import restore, resume_state

    cfg = smoke(data_cache, "memory.strategy=stream", "memory.gpu_budget_gb=0.05", "optim.batch_size=32")
    small = int(0.025 * GiB)

    def fresh():
        state = build_training(cfg, data, 1e-3, 4, torch.device("cpu"))
        state.placement.dsm = SwapManager(target=0.85, budget_bytes=small)
        return state

    straight = fresh()
    for epoch in (1, 2, 3):
        train_epoch(straight, data, epoch)
    first = fresh()
    for epoch in (1, 2):
        train_epoch(first, data, epoch)
    assert first.placement.dsm.swapped
    first.placement.synchronize()
    ckpt = write_checkpoint(
        tmp_path / "ckpt",
        model_state=first.model.state_dict(),
        metrics={},
        meta={"epoch": 2, "data_fingerprint": data.fingerprint},
        resume_state=resume_state(first, 2),
    )
    second = fresh()
    assert restore(second, ckpt, cfg, data) == 2
    assert second.placement.dsm.swapped == first.placement.dsm.swapped
    assert not any(second.placement.slots[u].resident for u in second.placement.dsm.swapped)
    train_epoch(second, data, 3)
    straight.placement.synchronize()
    second.placement.synchronize()
    _assert_same_training(straight, second)


def test_a_copy_home_drains_only_beside_the_turn_planned_for_it(data_cache, data):
    """Where the turns run otherwise than the plan said (the swap manager replans mid-step, and the train
    loop skips units that had their turn), a draining copy home is waited for as the next turn begins,
    instead of running beside a turn whose peak never counted it."""
    cfg = smoke(data_cache, "memory.strategy=stream", "memory.gpu_budget_gb=0.024", "optim.batch_size=16")
    state = build_training(cfg, data, 1e-3, 1, torch.device("cpu"))
    placement = state.placement
    unit = next(u for u in placement.plan.units if u.drain_in)
    other = next(u.name for u in placement.plan.units if u.resident)
    for beside, kept in ((unit.drain_in, True), (other, False)):
        placement.begin_turn(unit.name)
        placement.end_turn(unit.name)
        assert [d.beside for d in placement._draining] == [unit.drain_in]
        before = placement.accounted()
        placement.begin_turn(beside)
        assert bool(placement._draining) == kept, beside
        if not kept:  # its bytes are no longer on the device
            assert placement.accounted() < before
        placement.end_turn(beside)
        placement.end_step()
        assert placement._draining == []


def test_a_resume_state_written_by_foreach_adamw_resumes_fused(data_cache, data):
    """A resume state from before AdamW was fused (its parameter groups say fused None) resumes with
    fused AdamW (load_state_dict alone would take the saved groups' settings), and trains on exactly as
    the run that was never interrupted (on a CPU both kernels keep their step counters as the same
    float tensors)."""
    import io

    cfg = smoke(data_cache, "memory.strategy=stream", "memory.gpu_budget_gb=0.024", "optim.batch_size=16")

    def windows():
        batches = iterate_batches(data, "train", 16, shuffle=True, generator=torch.Generator().manual_seed(7))
        accum = cfg.optim.grad_accum
        return [
            Window(epoch=1, step=k + 1, first_batch=k * accum, batches=[next(batches) for _ in range(accum)])
            for k in range(3)
        ]

    def run(state, steps):
        for window in steps:
            train_step(state, window)
            state.schedule.step()
        state.placement.synchronize()

    straight = build_training(cfg, data, 1e-3, 2, torch.device("cpu"))
    run(straight, windows())
    first = build_training(cfg, data, 1e-3, 2, torch.device("cpu"))
    run(first, windows()[:2])
    saved = first.state_dict()
    for opt in saved["optimizers"].values():
        for group in opt["param_groups"]:
            group.update(fused=None, foreach=None)  # as torch.optim.AdamW(...) saved them before
    buffer = io.BytesIO()
    torch.save({"model": first.model.state_dict(), "state": saved}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    second = build_training(cfg, data, 1e-3, 2, torch.device("cpu"))
    second.model.load_state_dict(loaded["model"])
    second.load_state_dict(loaded["state"])
    assert all(g["fused"] and not g["foreach"] for o in second.optimizers.values() for g in o.param_groups)
    run(second, windows()[2:])
    _assert_same_training(straight, second)


# ---------------------------------------------------------------------------
# Validation, devices, precision


def test_validation_is_the_same_streamed_and_records_every_module(data_cache, data):
    from redheart_tune.model.groups import MODULES

    a = build_training(smoke(data_cache, "memory.strategy=resident"), data, 1e-3, 1, torch.device("cpu"))
    b = build_training(
        smoke(data_cache, "memory.strategy=stream", "memory.gpu_budget_gb=0.024", "optim.eval_batch_size=16"),
        data,
        1e-3,
        1,
        torch.device("cpu"),
    )
    va = validate_state(a, data, collect_activations=True)
    vb = validate_state(b, data, collect_activations=True)
    assert set(va.activations) == set(MODULES)  # group B's four analyzers included
    assert va.module_loss.keys() == vb.module_loss.keys()
    for m in va.module_loss:
        assert va.module_loss[m] == pytest.approx(vb.module_loss[m], rel=1e-5)
    assert va.accuracy == vb.accuracy


def test_a_gpu_ray_gave_that_torch_cannot_see_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trial_device([]) == torch.device("cpu")
    with pytest.raises(RuntimeError, match=r"Ray assigned this trial GPU\(s\) \[0\].*sees no CUDA device"):
        trial_device([0])


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_takes_bf16_only_where_native(monkeypatch, native, expected):
    def supported(including_emulation: bool = True) -> bool:
        return native or including_emulation  # an RTX 2070: bf16 only through emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert choose_precision("auto", torch.device("cuda")) == expected
    assert choose_precision("auto", torch.device("cpu")) is None
    assert choose_precision("fp16", torch.device("cuda")) == torch.float16


def test_every_unit_of_the_declaration_is_planned(data_cache):
    cfg = smoke(data_cache, "memory.strategy=stream", "memory.gpu_budget_gb=0.03")
    plan, _ = plan_for(cfg, task_specs("vader"), 384, device="cpu", budget=cpu_budget(cfg.memory))
    planned = {u.name for u in plan.units}
    assert planned == {u.name for u in selection_units()}
    assert set(GROUPS["group_a"]) <= {
        m for u in selection_units() if u.name in plan.resident for m in u.modules
    }


def test_a_failed_page_lock_falls_back_only_when_its_cuda_error_is_cleared(monkeypatch):
    """cudaHostRegister's failure stays the thread's last CUDA error: cleared, the caller may fall back
    to pageable memory (PinError); not cleared, it stops with the config key that avoids it."""
    from redheart_tune.engine.memory import transfer

    class Runtime:
        def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 (the CUDA name)
            return 2  # cudaErrorMemoryAllocation

    monkeypatch.setattr(torch.cuda, "cudart", Runtime)
    assert transfer._clear_cuda_error() is False  # a CPU torch loads no CUDA runtime
    with pytest.raises(RuntimeError, match="memory.pin_memory=false") as stop:
        transfer.page_locked(16)
    assert not isinstance(stop.value, transfer.PinError)
    monkeypatch.setattr(transfer, "_clear_cuda_error", lambda: True)
    with pytest.raises(transfer.PinError, match="CUDA error 2"):
        transfer.page_locked(16)
