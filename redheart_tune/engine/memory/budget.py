"""A trial's memory budget: how many bytes it may use, how that is enforced, and how use is measured.

On a GPU the budget is the smaller of ``memory.gpu_budget_gb`` and the trial's
fractional share of the card.  It is enforced on PyTorch's caching allocator with
``torch.cuda.set_per_process_memory_fraction`` (measured against reserved
memory), after this process's CUDA context has been subtracted, so what must fit
in the budget is ``max_memory_reserved + context``.

Everything is counted per process: a card may be shared by several trials
(``resources.gpu=0.5``), and the card's free memory (``mem_get_info``) counts all of
them.  A trial's context and use are its own process's:

- with NVML (``nvidia-ml-py``): this process's used memory on the card
  (``nvmlDeviceGetComputeRunningProcesses``, matched on ``os.getpid()``) less
  what its allocator has reserved.  It is measured after a warm-up that creates
  cuBLAS and cuDNN's state (the first training step would add it later), and once
  more after the first training step.  Other processes' memory is reported in a
  log line and never charged to the trial.
- without NVML: torch's own counters (``memory_reserved``) plus a context
  measured once, after the same warm-up, as the card's use outside this
  allocator.  That figure cannot tell other processes apart, so one larger than
  any context (``plausible_context``) is replaced by ``memory.context_gb``, and it
  is never measured again, so memory that appears later on the card cannot move it.

On a CPU-only trial with ``memory.strategy: stream`` the budget is a
byte-accounting one: the placement counts the bytes of weights, gradients and
AdamW moments it has put "on the device", and that count is what the plan, the
swap manager and the tests hold to the budget.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass

import torch

from redheart_tune.config import MemoryConfig
from redheart_tune.engine.memory.plan import MemoryPlan
from redheart_tune.engine.memory.sizes import GiB, size

log = logging.getLogger(__name__)

NVML_NOT_AVAILABLE = 2**64 - 1
"""NVML's NVML_VALUE_NOT_AVAILABLE (unsigned long long), for a used-memory figure it cannot give."""


@dataclass(frozen=True)
class Budget:
    bytes: int
    """What one trial may use on the device, CUDA context included."""
    context_bytes: int
    """This process's CUDA context: its bytes on the card outside its allocator (0 when counting bytes
    on a CPU)."""
    card_bytes: int | None
    """The card's total memory (None on a CPU-only trial)."""
    source: str
    """Which limit set it: 'memory.gpu_budget_gb' or 'GPU share'."""
    measured_context: bool
    context_source: str = "config"
    """How the context was measured: 'nvml' (this process's own use, measured again after the first
    step), 'warm-up' (the card's use outside this allocator, once, after the warm-up; no NVML), or
    'config' (memory.context_gb, nothing measured)."""
    others_bytes: int = 0
    """Other processes' memory on the card when last measured (NVML): reported, never charged."""


@dataclass(frozen=True)
class ProcessMemory:
    """NVML's per-process used memory on one card."""

    own: int
    """This process's bytes on the card: its CUDA context plus its allocator's reserved memory."""
    others: dict[int, int]
    """Every other process on the card: pid -> bytes."""


def configure_allocator() -> None:
    """Expandable segments, so reserved memory tracks allocated memory (set before the first CUDA allocation)."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def cpu_budget(cfg: MemoryConfig) -> Budget:
    """The byte-accounting budget of a CPU-only trial."""
    return Budget(
        bytes=int(cfg.gpu_budget_gb * GiB),
        context_bytes=0,
        card_bytes=None,
        source="memory.gpu_budget_gb",
        measured_context=False,
    )


def planning_budget(cfg: MemoryConfig) -> Budget:
    """The budget the plan assumes before any GPU is seen (``run.py params``): the config's card and context."""
    return Budget(
        bytes=int(cfg.gpu_budget_gb * GiB),
        context_bytes=int(cfg.context_gb * GiB),
        card_bytes=None,
        source="memory.gpu_budget_gb",
        measured_context=False,
    )


def plausible_context(cfg: MemoryConfig) -> int:
    """The most that can be one process's CUDA context, for the measure without NVML:
    ``memory.context_gb`` plus 0.6 GiB, and at least 1.5 GiB (a warmed-up context on CUDA 13 measured
    0.82-0.86 GiB, so two trials warming up together on one card, ~1.7 GiB, are not taken for one)."""
    return int(max(cfg.context_gb + 0.6, 1.5) * GiB)


def allocator_fraction(budget: Budget) -> float:
    """The share of the card the allocator may reserve: the trial's own budget less its own context."""
    assert budget.card_bytes, "a CUDA budget"
    return (budget.bytes - budget.context_bytes) / budget.card_bytes


# ---------------------------------------------------------------------------
# Reading the device.  Everything that asks torch.cuda or NVML goes through these
# functions (tests/test_gpu_budget.py replaces them with fakes on a CPU).


@functools.cache
def _nvml():
    """The ``pynvml`` module (``nvidia-ml-py``), initialised once; None where it is missing or NVML
    cannot start (no driver, no permission)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # ModuleNotFoundError, pynvml.NVMLError_*
        log.info("NVML is not available (%s): the CUDA context is measured once, after a warm-up", exc)
        return None
    return pynvml


def _nvml_index(device: torch.device) -> int:
    """NVML's index of ``device``: Ray sets CUDA_VISIBLE_DEVICES, so torch's cuda:0 may be another NVML
    device.  A wrong index only makes the reading miss this process, which then falls back."""
    try:
        return torch.cuda._get_nvml_device_index(device)
    except Exception:
        return device.index or 0


def process_memory(device: torch.device) -> ProcessMemory | None:
    """This process's and every other process's used memory on ``device``, per NVML; None where NVML
    is missing or does not see this process (no per-process figures, another PID namespace)."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(_nvml_index(device))
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception as exc:  # pynvml.NVMLError_*
        log.info("NVML cannot list the processes on %s (%s)", device, exc)
        return None
    pid, own, others = os.getpid(), None, {}
    for p in procs:
        used = getattr(p, "usedGpuMemory", None)
        if used is None or used >= NVML_NOT_AVAILABLE:
            if p.pid == pid:
                return None  # NVML will not say this process's use (e.g. MIG without permission)
            continue
        if p.pid == pid:
            own = (own or 0) + int(used)
        else:
            others[p.pid] = others.get(p.pid, 0) + int(used)
    if own is None:
        return None
    return ProcessMemory(own=own, others=others)


def card_memory(device: torch.device) -> tuple[int, int]:
    """The card's free and total bytes (all processes together)."""
    return torch.cuda.mem_get_info(device)


def allocator_reserved(device: torch.device) -> int:
    """Bytes this process's caching allocator holds on ``device``."""
    return torch.cuda.memory_reserved(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def set_allocator_fraction(fraction: float, device: torch.device) -> None:
    """Cap this process's allocator at ``fraction`` of the card."""
    torch.cuda.set_per_process_memory_fraction(fraction, device)


def warm_up(device: torch.device) -> None:
    """Create the CUDA context and what a first training step adds to it: cuBLAS handles and their
    kernels (fp32, bf16, fp16 matmuls), cuDNN (an LSTM forward and backward under autocast) and
    fused AdamW's kernel.  On CUDA 13 these made the context grow from 527 to 840-960 MiB during the
    first step when nothing warmed it up; measured after this, it is what training will see."""
    torch.cuda.init()
    # fork_rng: the warm-up's random numbers and LSTM initialisation leave the seeded generators as they were
    with torch.random.fork_rng(devices=[device.index or 0], device_type="cuda"), torch.cuda.device(device):
        torch.empty(1, device=device)
        x = torch.randn(4, 8, 32, device=device)
        lstm = torch.nn.LSTM(32, 32, batch_first=True).to(device)
        head = torch.nn.Linear(32, 32).to(device)
        opt = torch.optim.AdamW([*lstm.parameters(), *head.parameters()], lr=1e-3, fused=True)
        dtypes = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])
        for dtype in dtypes:
            with torch.autocast("cuda", dtype=dtype):
                out, _ = lstm(x)
                y = torch.nn.functional.layer_norm(head(out), (32,)).softmax(-1)
            loss = y.float().square().sum() + (x @ x.transpose(1, 2)).sum()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        del x, lstm, head, opt, out, y, loss
    torch.cuda.empty_cache()  # what this process cached (warm-up, earlier trials) would escape the cap


def reset_peaks(device: torch.device) -> None:
    torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------


def _report_others(mem: ProcessMemory | None, device: torch.device, when: str) -> int:
    """Log a line about other processes' memory on the card (never charged to this trial); their bytes."""
    if mem is None or not mem.others:
        return 0
    total = sum(mem.others.values())
    each = ", ".join(f"pid {pid}: {size(b)}" for pid, b in sorted(mem.others.items()))
    log.warning(
        "%s: %s of %s is used by other processes (%s), not charged to this trial (pid %d: %s)",
        when,
        size(total),
        device_name(device),
        each,
        os.getpid(),
        size(mem.own),
    )
    return total


def measure_context(cfg: MemoryConfig, device: torch.device) -> tuple[int, str, int]:
    """This process's CUDA context after the warm-up: (bytes, how it was measured, other processes' bytes)."""
    reserved = allocator_reserved(device)
    mem = process_memory(device)
    if mem is not None:
        others = _report_others(mem, device, "budget")
        return max(mem.own - reserved, 0), "nvml", others
    free, total = card_memory(device)
    outside = (total - free) - reserved
    if outside <= plausible_context(cfg):
        return outside, "warm-up", 0
    log.warning(
        "%s of %s are used outside this trial's allocator, more than one process's context (other "
        "processes?); without NVML they cannot be told apart, so %.2f GiB (memory.context_gb) is counted "
        "as this trial's context (pip install nvidia-ml-py measures this process's own)",
        size(outside),
        device_name(device),
        cfg.context_gb,
    )
    return int(cfg.context_gb * GiB), "config", max(outside - int(cfg.context_gb * GiB), 0)


def cuda_budget(cfg: MemoryConfig, device: torch.device, gpu_share: float) -> Budget:
    """Warm the context up, measure it (this process's own), pick the smaller of the configured budget
    and the GPU share, and cap the allocator at that budget less the context."""
    warm_up(device)
    context, how, others = measure_context(cfg, device)
    _, total = card_memory(device)
    configured = int(cfg.gpu_budget_gb * GiB)
    share = int(min(gpu_share, 1.0) * total)
    budget, source = (configured, "memory.gpu_budget_gb") if configured <= share else (share, "GPU share")
    if budget <= context:
        raise RuntimeError(
            f"GPU budget {budget / GiB:.2f} GiB ({source}) is smaller than the {context / GiB:.2f} GiB the "
            f"CUDA context already takes on {device_name(device)}; raise memory.gpu_budget_gb "
            "or resources.gpu"
        )
    out = Budget(
        bytes=budget,
        context_bytes=context,
        card_bytes=total,
        source=source,
        measured_context=how != "config",
        context_source=how,
        others_bytes=others,
    )
    set_allocator_fraction(allocator_fraction(out), device)
    reset_peaks(device)
    log.info(
        "GPU budget %s (%s): CUDA context %s (%s), allocator cap %s",
        size(budget),
        source,
        size(context),
        how,
        size(budget - context),
    )
    return out


def refresh_context(budget: Budget, device: torch.device) -> Budget:
    """Measure this process's context again, after the first training step: lazily loaded kernels can
    still add to it after the warm-up.  When it has grown, the allocator's cap is lowered so that
    reserved memory plus context stays within the budget.  Only NVML's per-process figure is used:
    without it the card's free memory would count other processes (the context measured after the
    warm-up stands)."""
    if device.type != "cuda" or budget.context_source != "nvml":
        return budget
    mem = process_memory(device)
    if mem is None:
        return budget
    others = _report_others(mem, device, "after the first step")
    context = max(mem.own - allocator_reserved(device), 0)
    if context <= budget.context_bytes:
        return dataclasses.replace(budget, others_bytes=others)
    if context >= budget.bytes:
        log.warning(
            "this process's CUDA context grew to %s, past the whole %s budget; the cap stays",
            size(context),
            size(budget.bytes),
        )
        return dataclasses.replace(budget, others_bytes=others)
    out = dataclasses.replace(budget, context_bytes=context, others_bytes=others)
    set_allocator_fraction(allocator_fraction(out), device)
    log.warning(
        "this process's CUDA context grew from %s to %s after the first step; the allocator's cap follows",
        size(budget.context_bytes),
        size(context),
    )
    return out


class MemoryBudgetError(RuntimeError):
    """The GPU ran out of memory under the trial's budget; the message says what to change."""


def out_of_memory(exc: BaseException, plan: MemoryPlan, budget: Budget, where: str) -> MemoryBudgetError:
    """The error a trial raises on a CUDA out-of-memory, with the numbers and what to change."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return MemoryBudgetError(
        f"out of GPU memory {where} under the {size(budget.bytes)} budget ({budget.source}, "
        f"{size(budget.context_bytes)} of it CUDA context); the plan ({plan.strategy}, streamed: "
        f"{', '.join(plan.streamed) or 'none'}) estimated a peak of {size(plan.peak_bytes)}. {first}\n"
        "Earlier checkpoints are intact. Memory settings never change the results, so resume with "
        "more headroom: memory.target=0.75, memory.stream_moments=sharded, or a larger "
        "memory.gpu_budget_gb where the card has it; a smaller micro-batch (optim.batch_size=2 "
        "optim.grad_accum=32, the same effective batch) needs a new run."
    )
