"""The memory component on a real GPU (skipped without one): `pytest -m cuda` on a GPU machine.

The CPU tests prove the arithmetic and the moves bit for bit; these exercise what a
CPU cannot: pinned buffers, the side stream and its events, the enforced memory
fraction, autocast with bf16 and fp16 plus the scaler, evaluation unit by unit, and
two processes sharing the card, each under its own budget.

Budgets are sized from the CUDA context this process measures after the budget's
warm-up (``tune.memory.budget.warm_up``), plus ``CONTEXT_MARGIN`` that the plans assume on
top of it, so the room the plan has for tensors is exactly what each test asks for,
on CUDA 12 and 13 alike (CUDA 13's context is ~400 MiB larger).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys
import threading
import time

import pytest
import torch

from benchmarks.synthetic import synthetic_data
from redheart_tune.config import load_config
from redheart_tune.data import iterate_batches
from redheart_tune.engine.loop import build_training, train_epoch
from redheart_tune.engine.memory import GiB, Window, configure_allocator, train_step, trial_budget
from redheart_tune.engine.validation import validate_state
from redheart_tune.model.family import build_model
from tests.conftest import REPO

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICE = torch.device("cuda", 0)
MiB = 2**20
TARGET = 0.85  # memory.target of these configs (the default)
CONTEXT_MARGIN_MIB = 256
"""Context the plans assume on top of the warmed-up one: kernels that load lazily on their first use
after the warm-up.  Without a warm-up the context grew 312-433 MiB during the first step on CUDA 13
(527 -> 839-960 MiB, ../shared/gpu-evidence/2026-12-04); the warm-up creates cuBLAS and cuDNN's
state, the bulk of that, so what is left is a few modules' kernels."""


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


def context_plus(tensors_mib: float) -> float:
    """memory.gpu_budget_gb whose plan has ``tensors_mib`` MiB for tensors: (this process's warmed-up
    context + CONTEXT_MARGIN_MIB + tensors) / target.  ``margined`` gives the plan that context."""
    probe = trial_budget(cfg(), DEVICE, 1.0)  # warms up, then measures this process's own context
    return round((probe.context_bytes + (CONTEXT_MARGIN_MIB + tensors_mib) * MiB) / TARGET / GiB, 6)


def margined(c, share=1.0):
    """The trial's budget (measured and enforced as tune.trainable makes it), the context the plan
    assumes raised by CONTEXT_MARGIN_MIB; the allocator's cap stays the budget less the measured context."""
    budget = trial_budget(c, DEVICE, share)
    return dataclasses.replace(budget, context_bytes=budget.context_bytes + CONTEXT_MARGIN_MIB * MiB)


def _steps(c, data, steps=3, share=1.0):
    state = build_training(c, data, 1e-3, 1, DEVICE, budget=margined(c, share))
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
    sa = {k: v.detach().cpu() for k, v in resident.model.state_dict().items()}
    resident_scale = resident.scaler.get_scale() if resident.scaler.is_enabled() else None
    del resident  # its weights and moments off the card, or they crowd the capped streamed run
    gc.collect()
    torch.cuda.empty_cache()
    # the plan's room for tensors: tiny streams with 20-28 MiB, mid with 400-700 MiB (plan_for on a CPU)
    budget = context_plus(512 if preset == "mid" else 24)
    streamed = _steps(cfg(*base, "memory.strategy=stream", f"memory.gpu_budget_gb={budget}"), data)
    assert streamed.placement.plan.streamed
    for slot in streamed.placement.slots.values():
        if slot.home is not None:
            assert slot.home.is_pinned()
    sb = streamed.model.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k].cpu(), rtol=1e-3, atol=1e-5, msg=k)
    if precision == "fp16":
        assert resident_scale is not None and resident_scale == streamed.scaler.get_scale()


def test_a_streamed_run_resumes_on_the_gpu():
    """A streamed run resumed from its saved state (through torch.save and a CPU load, as a checkpoint
    is read) continues as the run that was not interrupted.  The load puts the ``step`` counters of
    units that are out on the CPU, beside their weights; fused AdamW needs them on the device, where
    ``adopt_loaded_state`` moves them."""
    import io

    data = synthetic_data(64, 32)
    c = cfg(
        "model.preset=mid",
        "optim.precision=bf16",
        "memory.strategy=stream",
        "model.dropout=0",
        f"memory.gpu_budget_gb={context_plus(512)}",
    )

    def window(batches, k):
        return Window(1, k + 1, 2 * k, [next(batches), next(batches)])

    def batches():
        return iterate_batches(data, "train", 8, shuffle=True, generator=torch.Generator().manual_seed(7))

    state = build_training(c, data, 1e-3, 1, DEVICE, budget=margined(c))
    assert state.placement.plan.streamed
    order = batches()
    for k in range(2):
        train_step(state, window(order, k))
        state.schedule.step()
    state.placement.synchronize()
    saved = io.BytesIO()
    torch.save({"model": state.model.state_dict(), "state": state.state_dict()}, saved)
    train_step(state, window(order, 2))
    state.placement.synchronize()
    straight = {k: v.detach().cpu() for k, v in state.model.state_dict().items()}
    del state
    gc.collect()
    torch.cuda.empty_cache()

    saved.seek(0)
    loaded = torch.load(saved, map_location="cpu", weights_only=True)
    resumed = build_training(c, data, 1e-3, 1, DEVICE, budget=margined(c))
    resumed.model.load_state_dict(loaded["model"])
    resumed.load_state_dict(loaded["state"])
    for opt in resumed.optimizers.values():
        assert all(s["step"].device.type == "cuda" for s in opt.state.values())
    order = batches()
    for k in range(2):
        window(order, k)  # the windows the first two steps took
    train_step(resumed, window(order, 2))
    resumed.placement.synchronize()
    after = resumed.model.state_dict()
    for k in straight:
        torch.testing.assert_close(straight[k], after[k].cpu(), rtol=1e-4, atol=1e-6, msg=k)


def test_the_budget_is_enforced_and_held():
    """mid with 512 MiB for tensors: the allocator is capped at the budget less this process's context,
    streamed training stays inside the budget, and its second epoch neither retries an allocation nor
    swaps."""
    data = synthetic_data(128, 32)
    c = cfg("model.preset=mid", "memory.strategy=stream", f"memory.gpu_budget_gb={context_plus(512)}")
    budget = margined(c)
    measured = budget.context_bytes - CONTEXT_MARGIN_MIB * MiB
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    cap = budget.bytes - measured  # what cuda_budget let the allocator reserve
    torch.cuda.empty_cache()
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(cap + 64 * MiB, dtype=torch.uint8, device=DEVICE)
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

    # Past the first epoch the headroom below the cap keeps the allocator and the swap manager quiet: no
    # allocation has to free cached blocks and retry, and the DSM moves nothing the plan did not.
    retries = torch.cuda.memory_stats(DEVICE).get("num_alloc_retries", 0)
    second = train_epoch(state, data, 2)
    assert torch.cuda.memory_stats(DEVICE).get("num_alloc_retries", 0) == retries
    assert [m["module"] for m in second.memory_moves if m["action"] in ("swap_out", "swap_in")] == []


def test_validation_and_evaluation_stream_on_the_gpu():
    pytest.importorskip("ray", reason="the analysis package reads Tune experiments")
    from redheart_tune.analysis.evaluate import EvalSettings, predict

    data = synthetic_data(64, 32, val_rows=48)
    c = cfg("model.preset=mid", "memory.strategy=stream", f"memory.gpu_budget_gb={context_plus(512)}")
    state = build_training(c, data, 1e-3, 1, DEVICE, budget=margined(c))
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


def _sample_nvml(pids: list[int], peaks: dict[int, int], stop: threading.Event) -> None:
    """Each of ``pids``' peak used memory on the card, by NVML every 50 ms (the outside measure)."""
    import pynvml

    from redheart_tune.engine.memory.budget import _nvml_index

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index(DEVICE))
    while not stop.is_set():
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid in peaks and p.usedGpuMemory is not None:
                peaks[p.pid] = max(peaks[p.pid], int(p.usedGpuMemory))
        time.sleep(0.05)


def test_two_processes_share_the_card(tmp_path):
    """Two trial-like processes, each a 0.5 share of the card and a budget of its warmed-up context +
    CONTEXT_MARGIN_MIB + 512 MiB, build the mid model streamed, wait until both are built, then train
    4 steps side by side.  Each one's context is its own (it does not take the other's memory for
    context, as both trials did in ../shared/gpu-evidence/2026-12-04), and each stays under its budget
    by its own count (peak reserved + context) and by NVML's count from outside."""
    pytest.importorskip("pynvml", reason="per-process figures need NVML (pip install nvidia-ml-py)")
    overrides = ["optim.batch_size=8", "optim.grad_accum=2", "model.dropout=0.1", "data.max_tokens=32"]
    worker = REPO / "tests" / "cuda_share_worker.py"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(worker),
                str(barrier),
                name,
                "2",
                str(CONTEXT_MARGIN_MIB),
                "512",
                *overrides,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("a", "b")
    ]
    peaks = {p.pid: 0 for p in procs}
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_nvml, args=(list(peaks), peaks, stop), daemon=True)
    sampler.start()
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
        sampler.join(5)
    results = []
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
        line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
        results.append({**json.loads(line.removeprefix("RESULT ")), "nvml_peak": peaks[p.pid]})
    for r in results:
        print(
            f"{r['name']}: budget {r['budget'] / GiB:.3f} GiB ({r['source']}), context measured "
            f"{r['context_measured'] / MiB:.0f} MiB ({r['context_source']}), at the end "
            f"{(r['context_nvml_end'] or 0) / MiB:.0f} MiB; peak reserved {r['peak_reserved'] / MiB:.0f} MiB; "
            f"NVML peak {r['nvml_peak'] / MiB:.0f} MiB; other processes {r['others_after'] / MiB:.0f} MiB; "
            f"streamed {r['streamed']}"
        )
    for r, other in zip(results, results[::-1], strict=True):
        assert r["source"] == "memory.gpu_budget_gb" and r["context_source"] == "nvml"
        assert r["others_nvml_end"] > 0  # it saw the other process on the card (reported, not charged)
        # its context is its own: at most the margin over the warmed-up figure, never the other's memory
        assert r["context_after"] <= r["context_measured"] + CONTEXT_MARGIN_MIB * MiB
        assert r["context_nvml_end"] <= r["context_measured"] + CONTEXT_MARGIN_MIB * MiB
        assert r["context_nvml_end"] < other["nvml_peak"]
        assert r["streamed"]
        assert r["peak_reserved"] + r["context_after"] <= r["budget"]
        assert 0 < r["nvml_peak"] <= r["budget"]


@pytest.mark.parametrize("strategy", ["resident", "stream"])
def test_the_step_never_makes_the_host_wait(strategy, monkeypatch):
    """A training step under ``torch.cuda.set_sync_debug_mode("error")``: any operation that makes the
    host wait for the device (``.item()``, a boolean mask, a blocking copy, a copy home into pageable
    memory) raises.  The step's one read of its numbers at the end (``read_results``) is by design and
    runs with the check off.  The first step runs unchecked: it measures the context again.  Dropout is
    off: cuDNN reseeds an RNN's dropout state by reading one number back, once per RNN call with dropout."""
    import redheart_tune.engine.memory.step as step_module

    data = synthetic_data(64, 32)
    # dropout off: with it on, each RNN call's cuDNN reseed reads one number back (_reseed_cudnn_dropout)
    overrides = ["model.preset=mid", "optim.precision=bf16", f"memory.strategy={strategy}", "model.dropout=0"]
    if strategy == "stream":
        overrides.append(f"memory.gpu_budget_gb={context_plus(512)}")
    c = cfg(*overrides)
    state = build_training(c, data, 1e-3, 1, DEVICE, budget=margined(c))
    batches = iterate_batches(data, "train", 8, shuffle=True, generator=torch.Generator().manual_seed(7))
    train_step(state, Window(1, 1, 0, [next(batches), next(batches)]))
    read = step_module.read_results

    def read_unchecked(*args, **kwargs):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return read(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(step_module, "read_results", read_unchecked)
    torch.cuda.synchronize(DEVICE)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in (2, 3):
            train_step(state, Window(1, k, 2 * (k - 1), [next(batches), next(batches)]))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if strategy == "stream":
        assert state.placement.plan.streamed


def test_checkpointed_group_b_draws_the_forwards_dropout_masks():
    """mid's analyzers run 2-layer cuDNN RNNs with dropout between the layers. cuDNN keeps its dropout
    state across calls, and activation checkpointing recomputes each analyzer after restoring the
    generator to that analyzer's entry: without ``blocks._reseed_cudnn_dropout`` the recompute drew
    other masks than the forward and group_b's gradients were silently wrong. With it, checkpointed
    and not give the same gradients (to rounding: index_select's backward adds atomically)."""
    data = synthetic_data(16, 32)
    model = build_model(cfg("model.preset=mid").model, data.tasks, data.input_dim).to(DEVICE).train()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(8, 32, data.input_dim, generator=gen).to(DEVICE)
    lengths = torch.tensor([32, 30, 25, 20, 17, 9, 5, 2])
    mask = (torch.arange(32)[None, :] < lengths[:, None]).to(DEVICE)

    def grads(checkpoint: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        out = model.forward_unit(
            "group_b", tokens, mask, tokens.mean(1), lengths=lengths, checkpoint=checkpoint
        )
        sum(p.float().square().mean() for p in out.values()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and any(".rnn." in n for n in plain)
    for name, g in plain.items():
        torch.testing.assert_close(
            checkpointed[name], g, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}"
        )
