"""One explicit training loop in plain PyTorch: no Ray here, so tests and benchmarks can call it bare.

    state = build_training(cfg, data, lr, epochs, device)
    for epoch in range(1, epochs + 1):
        train_stats = train_epoch(state, data, epoch)
        val = validate_state(state, data, "val")     # engine/validation.py

Where the weights live (all on the device, or streamed unit by unit through a GPU
budget) is the memory component's business (``engine.memory``): the loop hands it
each window of ``grad_accum`` micro-batches and gets the step's numbers back
(``engine.memory.step.train_step``).  The LR schedule is in ``engine/schedule.py``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from redheart_tune.config import Config
from redheart_tune.data import EncodedData, iterate_batches, num_batches
from redheart_tune.engine.checkpoints import capture_rng, restore_rng
from redheart_tune.engine.memory import (
    Budget,
    NonFiniteLossError,
    Placement,
    SwapManager,
    UnitForward,
    Window,
    compiled_forwards,
    cpu_budget,
    loss_weights,
    plan_for,
    total_of,
    train_step,
)
from redheart_tune.engine.schedule import Schedule, lr_factor
from redheart_tune.model.family import RedHeart, build_model
from redheart_tune.model.groups import UNIT_MODULES, UNITS
from redheart_tune.model.tasks import TaskSpec
from redheart_tune.util.timing import timed

__all__ = [
    "EpochResult",
    "NonFiniteLossError",
    "StepInfo",
    "TrainingState",
    "build_training",
    "choose_precision",
    "seed_everything",
    "train_epoch",
]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------
# Training state


@dataclass
class TrainingState:
    """Everything a resume must restore, plus what the loop needs to run."""

    model: RedHeart
    optimizers: dict[str, torch.optim.Optimizer]  # one AdamW per selection unit
    schedule: Schedule
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # the data order; saved and restored for exact resume
    placement: Placement  # where each unit's weights and moments are
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: fp32
    tasks: dict[str, TaskSpec]
    task_weights: dict[str, float]
    fusion_weights: dict[str, float]
    batch_size: int
    eval_batch_size: int
    grad_accum: int
    grad_clip: float
    steps_per_epoch: int
    seed: int  # dropout streams derive from it
    param_names: dict[nn.Parameter, str] = field(default_factory=dict)
    loss_weights: dict[str, float] = field(default_factory=dict)
    pad_multiple: int = 1  # a forward pass's tokens are padded to a multiple of this (few shapes)
    max_tokens: int | None = None
    setup_s: dict[str, float] = field(default_factory=dict)  # build_training's phases: model, plan, placement
    forwards: dict[str, UnitForward] | None = None  # each unit's compiled forward (optim.compile); None: eager

    def state_dict(self) -> dict:
        """Everything but the weights that a resume needs to continue bit for bit: each unit's AdamW,
        the schedule, the scaler, the data order, every RNG, and the placement's step shape."""
        return {
            "optimizers": {unit: opt.state_dict() for unit, opt in self.optimizers.items()},
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "rng": capture_rng(),
            "memory": self.placement.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """``state_dict``'s inverse, after the weights are loaded: moments of streamed units go home."""
        for unit, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][unit])
            # load_state_dict takes the saved groups' settings: a checkpoint from before AdamW was fused
            # would turn it back to foreach (and its temporary, which the plan no longer counts)
            for group in opt.param_groups:
                group.update(fused=True, foreach=None, capturable=False)
        self.placement.adopt_loaded_state()
        self.placement.restore(state["memory"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        restore_rng(state["rng"])


def choose_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: on CUDA, bf16 only where the card runs it natively, else fp16 (with the
    scaler); None (fp32) on a CPU or with precision fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    # An RTX 2070 "supports" bf16 through emulation at a fraction of the speed: only native counts.
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def unit_param_groups(model: nn.Module, unit: str, weight_decay: float) -> list[dict]:
    """One unit's AdamW parameter groups: decayed (matrices) and undecayed (biases, norms, 1-d)."""
    params = [p for m in UNIT_MODULES[unit] for p in model.get_submodule(m).parameters()]
    decay = [p for p in params if p.ndim >= 2]
    keep = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": f"{unit}/decay"},
        {"params": keep, "weight_decay": 0.0, "name": f"{unit}/no_decay"},
    ]
    return [g for g in groups if g["params"]]


def unit_optimizer(model: nn.Module, unit: str, weight_decay: float, lr: float) -> torch.optim.AdamW:
    """One unit's AdamW, fused: one kernel updates every parameter of a call (a whole unit, or one
    moment shard of a streamed one) in place, where ``foreach`` launches a dozen passes over the
    parameters and allocates a 4-byte temporary per parameter (``plan.py`` counts no temporary).
    Its ``step`` counters live on the device the unit steps on (``Placement.adopt_loaded_state``)."""
    return torch.optim.AdamW(unit_param_groups(model, unit, weight_decay), lr=lr, fused=True)


def build_training(
    cfg: Config,
    data: EncodedData,
    lr: float,
    epochs: int,
    device: torch.device,
    *,
    budget: Budget | None = None,
) -> TrainingState:
    """Model, one AdamW per unit, schedule, scaler and the memory placement; seeds everything first.

    ``budget``: the trial's memory budget (``tune.memory.trial_budget``); on a
    CPU it defaults to the byte-accounting budget of ``memory.gpu_budget_gb``.
    """
    if device.type == "cuda" and budget is None:
        raise ValueError("a CUDA trial needs its measured budget (tune.memory.trial_budget)")
    budget = budget or cpu_budget(cfg.memory)
    setup_s: dict[str, float] = {}
    with timed(setup_s, "model"):
        seed_everything(cfg.run.seed)
        model = build_model(cfg.model, data.tasks, data.input_dim)  # on the CPU; the placement moves it
        optimizers = {unit: unit_optimizer(model, unit, cfg.optim.weight_decay, lr) for unit in UNITS}
    with timed(setup_s, "plan"):
        plan, sizes = plan_for(cfg, data.tasks, data.input_dim, device=device.type, budget=budget)
    dsm = SwapManager(cfg.memory.target, budget.bytes) if cfg.memory.dsm and plan.device != "cpu" else None
    with timed(setup_s, "placement"):  # resident units to the device, home buffers (pinned)
        placement = Placement(
            model, optimizers, plan, sizes, device, budget, pin_memory=cfg.memory.pin_memory, dsm=dsm
        )
    batches = num_batches(data, "train", cfg.optim.batch_size)
    steps_per_epoch = math.ceil(batches / cfg.optim.grad_accum)
    total = steps_per_epoch * epochs
    warmup = max(1, round(cfg.optim.warmup_ratio * total)) if cfg.optim.warmup_ratio > 0 else 0
    cycle = max(1, cfg.optim.cycle_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=warmup, cycle_steps=cycle, min_ratio=cfg.optim.min_lr_ratio)

    dtype = choose_precision(cfg.optim.precision, device)
    return TrainingState(
        model=model,
        optimizers=optimizers,
        schedule=Schedule(optimizers, lr, factor),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        generator=torch.Generator().manual_seed(cfg.run.seed),
        placement=placement,
        device=device,
        autocast_dtype=dtype,
        tasks=data.tasks,
        task_weights=dict(cfg.optim.task_weights),
        fusion_weights=dict(cfg.model.fusion_weights),
        batch_size=cfg.optim.batch_size,
        eval_batch_size=cfg.optim.eval_batch_size,
        grad_accum=cfg.optim.grad_accum,
        grad_clip=cfg.optim.grad_clip,
        steps_per_epoch=steps_per_epoch,
        seed=cfg.run.seed,
        param_names={p: n for n, p in model.named_parameters()},
        loss_weights=loss_weights(dict(cfg.optim.task_weights)),
        pad_multiple=cfg.optim.pad_multiple,
        max_tokens=cfg.data.max_tokens,
        setup_s=setup_s,
        forwards=compiled_forwards(model) if cfg.optim.compile else None,
    )


# ---------------------------------------------------------------------------
# Train and validate


@dataclass
class EpochResult:
    loss: float
    accuracy: float  # emotion (headline) accuracy of the fused prediction on the training batches
    grad_norm: float  # mean over optimizer steps of the whole model's gradient norm (before clipping)
    seconds: float
    lr: float  # LR at the last optimizer step of the epoch
    lrs: list[float]  # LR of every optimizer step (the schedule, visible)
    grad_stats: dict | None = None
    skipped_units: int = 0  # fp16 unit steps skipped for overflowed gradients
    memory_moves: list[dict] = field(default_factory=list)  # every move between GPU and CPU
    memory_trace: list[dict] = field(default_factory=list)  # every unit turn's peak use


@dataclass(frozen=True)
class StepInfo:
    """One optimizer step, as ``train_epoch``'s ``on_step`` sees it (``tune.progress`` reads it)."""

    epoch: int
    step: int  # optimizer steps done in this epoch, from 1
    steps_per_epoch: int
    rows: int  # training rows (samples) in this step
    loss: float  # the step's total loss, row-weighted over its micro-batches
    lr: float  # the LR this step used
    grad_norm: float  # the whole model's gradient norm, before clipping
    seconds: float  # since the epoch began


def train_epoch(
    state: TrainingState,
    data: EncodedData,
    epoch: int,
    *,
    collect_grad_stats: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
) -> EpochResult:
    """One pass over the training split, ``grad_accum`` micro-batches per optimizer step.

    ``on_step``: called after every optimizer step (progress, per-step logging); it
    must not touch the training state.
    """
    state.model.train()
    t0 = time.perf_counter()
    loss_sum, n_rows, correct, counted, skipped = 0.0, 0, 0.0, 0, 0
    norms: list[float] = []
    lrs: list[float] = []
    stats = None
    total_batches = num_batches(data, "train", state.batch_size)
    batches = iterate_batches(data, "train", state.batch_size, shuffle=True, generator=state.generator)
    weights = state.loss_weights
    for step in range(state.steps_per_epoch):
        first = step * state.grad_accum
        window = [next(batches) for _ in range(min(state.grad_accum, total_batches - first))]
        last = step + 1 == state.steps_per_epoch
        lrs.append(state.schedule.lr)
        result = train_step(
            state, Window(epoch, step + 1, first, window, collect_grad_stats=collect_grad_stats and last)
        )
        state.schedule.step()
        totals = total_of(result, weights)
        step_loss, step_rows = float(np.dot(totals, result.rows)), sum(result.rows)
        loss_sum += step_loss
        n_rows += step_rows
        correct += result.correct
        counted += result.counted
        norms.append(math.sqrt(sum(v * v for v in result.unit_norms.values())))
        skipped += len(result.skipped)
        if result.grad_stats is not None:
            stats = result.grad_stats
        if on_step is not None:
            on_step(
                StepInfo(
                    epoch=epoch,
                    step=step + 1,
                    steps_per_epoch=state.steps_per_epoch,
                    rows=step_rows,
                    loss=step_loss / max(step_rows, 1),
                    lr=lrs[-1],
                    grad_norm=norms[-1],
                    seconds=time.perf_counter() - t0,
                )
            )
    moves, trace = state.placement.drain()
    finite = [n for n in norms if math.isfinite(n)]
    return EpochResult(
        loss=loss_sum / max(n_rows, 1),
        accuracy=correct / max(counted, 1),
        grad_norm=float(np.mean(finite)) if finite else float("nan"),
        seconds=time.perf_counter() - t0,
        lr=lrs[-1] if lrs else state.schedule.lr,
        lrs=lrs,
        grad_stats=stats,
        skipped_units=skipped,
        memory_moves=moves,
        memory_trace=trace,
    )
