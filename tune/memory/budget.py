"""A trial's memory budget: how many bytes it may use, how that is enforced, and how use is measured.

On a GPU the budget is the smaller of ``memory.gpu_budget_gb`` and the trial's
fractional share of the card.  It is enforced on PyTorch's caching allocator with
``torch.cuda.set_per_process_memory_fraction`` (measured against reserved
memory), after the CUDA context and anything else on the card outside this
process's allocator has been subtracted, so what must fit in the budget is
``max_memory_reserved + context``.

On a CPU-only trial with ``memory.strategy: stream`` the budget is a
byte-accounting one: the placement counts the bytes of weights, gradients and
AdamW moments it has put "on the device", and that count is what the plan, the
swap manager and the tests hold to the budget.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from tune.config import MemoryConfig
from tune.memory.plan import GiB, MemoryPlan, size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    bytes: int
    """What one trial may use on the device, CUDA context included."""
    context_bytes: int
    """Bytes on the card outside this process's allocator (0 when counting bytes on a CPU)."""
    card_bytes: int | None
    """The card's total memory (None on a CPU-only trial)."""
    source: str
    """Which limit set it: 'memory.gpu_budget_gb' or 'GPU share'."""
    measured_context: bool


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


def cuda_budget(cfg: MemoryConfig, device: torch.device, gpu_share: float) -> Budget:
    """Measure the context, pick the smaller of the configured budget and the GPU share, enforce it."""
    torch.cuda.init()
    torch.empty(1, device=device)  # creates the context and the allocator
    torch.cuda.empty_cache()  # memory this process cached earlier would escape the new cap
    free, total = torch.cuda.mem_get_info(device)
    outside = (total - free) - torch.cuda.memory_reserved(device)
    context, measured = outside, True
    if outside > 2 * cfg.context_gb * GiB:
        log.warning(
            "%.2f GiB of %s are used outside this trial's allocator (other processes?); counting %.2f GiB "
            "(memory.context_gb) as this trial's context",
            outside / GiB,
            torch.cuda.get_device_name(device),
            cfg.context_gb,
        )
        context, measured = int(cfg.context_gb * GiB), False
    configured = int(cfg.gpu_budget_gb * GiB)
    share = int(min(gpu_share, 1.0) * total)
    budget, source = (configured, "memory.gpu_budget_gb") if configured <= share else (share, "GPU share")
    if budget <= context:
        raise RuntimeError(
            f"GPU budget {budget / GiB:.2f} GiB ({source}) is smaller than the {context / GiB:.2f} GiB the "
            f"CUDA context already takes on {torch.cuda.get_device_name(device)}; raise memory.gpu_budget_gb "
            "or resources.gpu"
        )
    torch.cuda.set_per_process_memory_fraction((budget - context) / total, device)
    torch.cuda.reset_peak_memory_stats(device)
    return Budget(
        bytes=budget, context_bytes=context, card_bytes=total, source=source, measured_context=measured
    )


def refresh_context(budget: Budget, device: torch.device) -> Budget:
    """Measure what lies outside this process's allocator again, after the first training step: cuBLAS and
    cuDNN workspaces and lazily loaded kernels add to the context after the budget was first set.  When it
    has grown, the allocator's cap is lowered so that reserved memory plus context stays within the budget."""
    if device.type != "cuda" or not budget.measured_context:
        return budget
    free, total = torch.cuda.mem_get_info(device)
    outside = (total - free) - torch.cuda.memory_reserved(device)
    if outside <= budget.context_bytes:
        return budget
    if outside >= budget.bytes:
        log.warning(
            "the CUDA context grew to %s, past the whole %s budget; the cap stays",
            size(outside),
            size(budget.bytes),
        )
        return budget
    torch.cuda.set_per_process_memory_fraction((budget.bytes - outside) / total, device)
    log.warning(
        "the CUDA context grew from %s to %s after the first step; the allocator's cap follows",
        size(budget.context_bytes),
        size(outside),
    )
    return dataclasses.replace(budget, context_bytes=outside)


class MemoryBudgetError(RuntimeError):
    """The GPU ran out of memory under the trial's budget; the message says what to change."""


def out_of_memory(exc: BaseException, plan: MemoryPlan, budget: Budget, where: str) -> MemoryBudgetError:
    """The error a trial raises on a CUDA out-of-memory, with the numbers and SPEC §4.1's advice."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return MemoryBudgetError(
        f"out of GPU memory {where} under the {size(budget.bytes)} budget ({budget.source}, "
        f"{size(budget.context_bytes)} of it CUDA context); the plan ({plan.strategy}, streamed: "
        f"{', '.join(plan.streamed) or 'none'}) estimated a peak of {size(plan.peak_bytes)}. {first}\n"
        "Earlier checkpoints are intact. Memory settings never change the results, so resume with "
        "more headroom: memory.target=0.75 (SPEC §4.1), memory.stream_moments=sharded, or a larger "
        "memory.gpu_budget_gb where the card has it; a smaller micro-batch (optim.batch_size=2 "
        "optim.grad_accum=32, the same effective batch) needs a new run."
    )
