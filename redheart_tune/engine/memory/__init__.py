"""The memory component: fitting the model into a GPU budget.

    plan = plan_for(cfg, tasks, input_dim, device, budget)    # which units stay, which stream
    placement = Placement(model, optimizers, plan, ...)        # carries it out, runs the swap manager
    train_step(state, window)                                  # one optimizer step, resident or streamed

The training loop asks this package for the step and knows nothing else about
where the weights live.  See sizes.py and plan.py for the arithmetic, placement.py for the
moves, dsm.py for the run-time rule and step.py for why the results do not
depend on the strategy.
"""

from __future__ import annotations

import dataclasses
import json

import torch

from redheart_tune.config import Config
from redheart_tune.engine.memory.budget import (
    Budget,
    MemoryBudgetError,
    configure_allocator,
    cpu_budget,
    cuda_budget,
    out_of_memory,
    planning_budget,
)
from redheart_tune.engine.memory.dsm import SwapManager
from redheart_tune.engine.memory.placement import Placement
from redheart_tune.engine.memory.plan import MemoryPlan, PlanError, PlanSettings, format_plan, make_plan
from redheart_tune.engine.memory.sizes import GiB, UnitSize, measure_units
from redheart_tune.engine.memory.step import (
    LOSS_COLUMNS,
    EvalMover,
    NonFiniteLossError,
    StepResult,
    UnitForward,
    Window,
    compiled_forwards,
    loss_weights,
    predict_outputs,
    total_of,
    train_step,
)
from redheart_tune.model.family import build_model
from redheart_tune.model.tasks import TaskSpec

__all__ = [
    "LOSS_COLUMNS",
    "Budget",
    "EvalMover",
    "GiB",
    "MemoryBudgetError",
    "MemoryPlan",
    "NonFiniteLossError",
    "Placement",
    "PlanError",
    "StepResult",
    "SwapManager",
    "UnitForward",
    "UnitSize",
    "Window",
    "compiled_forwards",
    "configure_allocator",
    "cpu_budget",
    "cuda_budget",
    "format_plan",
    "loss_weights",
    "memory_report",
    "params_text",
    "out_of_memory",
    "plan_for",
    "planning_budget",
    "predict_outputs",
    "total_of",
    "train_step",
    "trial_budget",
]


def autocast_bytes(precision: str, on_gpu: bool) -> int:
    """Bytes per element of autocast's casts and activations: 2 under bf16/fp16, 4 in fp32."""
    return 4 if (precision == "fp32" or not on_gpu) else 2


def trial_budget(cfg: Config, device: torch.device, gpu_share: float) -> Budget:
    """The budget of a trial on ``device``: measured and enforced on a GPU, counted on a CPU."""
    if device.type == "cuda":
        return cuda_budget(cfg.memory, device, gpu_share)
    return cpu_budget(cfg.memory)


def plan_for(
    cfg: Config,
    tasks: dict[str, TaskSpec],
    input_dim: int,
    *,
    device: str,
    budget: Budget,
) -> tuple[MemoryPlan, tuple[UnitSize, ...]]:
    """The memory plan of ``cfg``'s model for a trial on a ``device`` ('cuda' or 'cpu') with ``budget``,
    and the unit sizes it was made from.  Each unit's forward and backward take ``optim.micro_batch``
    rows at once, or (auto) the largest share of the window its turn fits.

    On a CPU-only trial, 'stream' counts bytes against the budget and 'auto' or
    'resident' keep everything where it is (there is no device memory to save).
    """
    on_gpu = device == "cuda"
    kind = "cuda" if on_gpu else ("accounting" if cfg.memory.strategy == "stream" else "cpu")
    elem = autocast_bytes(cfg.optim.precision, on_gpu)
    with torch.device("meta"):
        model = build_model(cfg.model, tasks, input_dim)
    sizes = measure_units(model, cfg.optim.batch_size, cfg.data.max_tokens, input_dim, elem)
    settings = PlanSettings(
        requested=cfg.memory.strategy,
        device=kind,
        budget_bytes=budget.bytes,
        target=cfg.memory.target,
        context_bytes=budget.context_bytes,
        cast_bytes=0 if elem == 4 else 2,
        shard_bytes=cfg.memory.shard_mb * 2**20,
        prefetch=cfg.memory.prefetch and kind != "cpu",
        always_shard=cfg.memory.stream_moments == "sharded",
    )
    o = cfg.optim
    plan = make_plan(
        sizes, settings, window=o.grad_accum, requested_pass=o.micro_batch // o.batch_size or None
    )
    chosen = {u.name: u for u in plan.units}
    return plan, tuple(
        dataclasses.replace(s, pass_batches=chosen[s.name].pass_batches, checkpoint=chosen[s.name].checkpoint)
        for s in sizes
    )


def memory_report(cfg: Config, tasks: dict[str, TaskSpec], input_dim: int) -> dict:
    """The plan for ``cfg`` on a GPU with its ``memory.gpu_budget_gb`` (what ``run.py params`` prints),
    JSON-ready, with the table as ``text``; a plan that cannot fit gives its PlanError's message."""
    budget = planning_budget(cfg.memory)
    try:
        plan, _ = plan_for(cfg, tasks, input_dim, device="cuda", budget=budget)
    except PlanError as exc:
        return {"fits": False, "error": str(exc), "text": str(exc)}
    return {
        "fits": True,
        "strategy": plan.strategy,
        "budget_bytes": plan.budget_bytes,
        "target": plan.target,
        "context_bytes": plan.context_bytes,
        "peak_bytes": plan.peak_bytes,
        "resident_peak_bytes": plan.resident_peak,
        "transfer_bytes_per_step": plan.transfer_bytes_per_step,
        "waited_bytes_per_step": plan.waited_bytes_per_step,
        "resident": list(plan.resident),
        "streamed": list(plan.streamed),
        "units": [dataclasses.asdict(u) for u in plan.units],
        "text": format_plan(plan),
    }


def params_text(cfg: Config, *, as_json: bool = False) -> str:
    """``run.py params``: parameters per module and group, the memory estimate, and the plan for the
    config's GPU budget (as a table, or all of it as JSON)."""
    from redheart_tune.data import task_specs
    from redheart_tune.data.encoding import ENCODER_DIMS
    from redheart_tune.model.report import format_params_report, params_report

    tasks, width = task_specs(cfg.data.source), ENCODER_DIMS[cfg.data.encoder]
    report = params_report(cfg.model, tasks, input_dim=width)
    plan = memory_report(cfg, tasks, width)
    if as_json:
        return json.dumps({**report, "memory_plan": plan}, indent=2)
    return format_params_report(report) + "\n\n" + plan["text"]
