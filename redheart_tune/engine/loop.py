"""One explicit training loop in plain PyTorch: no Ray here, so tests and benchmarks can call it bare.

state = build_training(cfg, data, lr, epochs, device)
for epoch in range(1, epochs + 1):
    train_stats = train_epoch(state, data, epoch)
    val = validate_state(state, data, "val")

Where the weights live (all on the device, or streamed unit by unit through a GPU
budget) is the memory component's business (``tune.memory``): the loop hands it
each window of ``grad_accum`` micro-batches and gets the step's numbers back.
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
    Window,
    cpu_budget,
    loss_weights,
    plan_for,
    predict_outputs,
    total_of,
    train_step,
)
from redheart_tune.model.family import RedHeart, build_model, fuse
from redheart_tune.model.groups import MODULE_TASK, UNIT_MODULES, UNITS
from redheart_tune.model.losses import metric_sums, module_losses, total_loss
from redheart_tune.model.tasks import TaskSpec

__all__ = [
    "EpochResult",
    "NonFiniteLossError",
    "Schedule",
    "StepInfo",
    "TrainingState",
    "ValidationResult",
    "build_training",
    "choose_precision",
    "lr_factor",
    "seed_everything",
    "train_epoch",
    "validate",
    "validate_state",
    "weight_stats",
]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------
# Learning-rate schedule: linear warm-up, then cosine cycles that really restart.


def lr_factor(step: int, *, warmup_steps: int, cycle_steps: int, min_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based).

    Warm-up rises linearly to 1; after it, cosine cycles of ``cycle_steps`` fall
    from 1 to ``min_ratio`` and restart at 1 (SGDR).  The original's first cycle
    was longer than its run and never restarted; here the cycle length is in
    epochs, so a 60-epoch run with 10-epoch cycles restarts five times.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) % cycle_steps
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t / cycle_steps))


class Schedule:
    """The LR of every unit's optimizer: ``peak_lr * lr_factor(step)``, one count for all of them."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], peak_lr: float, factor):
        self.optimizers, self.peak_lr, self.factor = optimizers, peak_lr, factor
        self.step_count = 0
        self._apply()

    @property
    def lr(self) -> float:
        return self.peak_lr * self.factor(self.step_count)

    def _apply(self) -> None:
        lr = self.lr
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "peak_lr": self.peak_lr}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


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
    setup_s, t = {}, time.perf_counter()
    seed_everything(cfg.run.seed)
    model = build_model(cfg.model, data.tasks, data.input_dim)  # on the CPU; the placement moves it
    optimizers = {
        unit: torch.optim.AdamW(unit_param_groups(model, unit, cfg.optim.weight_decay), lr=lr)
        for unit in UNITS
    }
    setup_s["model"], t = time.perf_counter() - t, time.perf_counter()
    plan, sizes = plan_for(cfg, data.tasks, data.input_dim, device=device.type, budget=budget)
    setup_s["plan"], t = time.perf_counter() - t, time.perf_counter()
    dsm = SwapManager(cfg.memory.target, budget.bytes) if cfg.memory.dsm and plan.device != "cpu" else None
    placement = Placement(
        model, optimizers, plan, sizes, device, budget, pin_memory=cfg.memory.pin_memory, dsm=dsm
    )
    setup_s["placement"] = time.perf_counter() - t  # resident units to the device, home buffers (pinned)
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
    )


# ---------------------------------------------------------------------------
# Statistics


def weight_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per-parameter weight statistics (mean, std, norm, sparsity = share of |w| < 1e-6)."""
    out = {}
    for name, p in model.named_parameters():
        w = p.detach().float()
        values = torch.stack(
            [
                w.mean(),
                w.std() if w.numel() > 1 else w.new_zeros(()),
                w.norm(),
                (w.abs() < 1e-6).float().mean(),
            ]
        ).tolist()
        out[name] = dict(zip(("mean", "std", "norm", "sparsity"), values, strict=True))
    return out


class ActivationStats:
    """Running mean, std and share of zeros of every module's activations (``RedHeart.forward_unit``'s
    ``record`` callback), kept as device tensors until ``result()``."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # module -> [n, sum, sum_sq, zeros]

    def __call__(self, module: str, t: torch.Tensor) -> None:
        t = t.detach().float()
        row = torch.stack([t.new_full((), float(t.numel())), t.sum(), (t * t).sum(), (t == 0).sum().float()])
        acc = self.sums.get(module)
        self.sums[module] = row.double() if acc is None else acc + row.double()

    def result(self) -> dict[str, dict[str, float]]:
        out = {}
        for key, acc in self.sums.items():
            n, s, sq, z = acc.tolist()
            mean = s / n
            out[key] = {"mean": mean, "std": math.sqrt(max(sq / n - mean * mean, 0.0)), "zero_share": z / n}
        return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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


@dataclass
class ValidationResult:
    loss: float  # total loss, the same weighting as training
    module_loss: dict[str, float]
    module_metric: dict[str, float]  # accuracy (classification tasks) or MAE (regression)
    task_metric: dict[str, float]  # of the fused prediction per task
    accuracy: float  # the headline: fused emotion accuracy
    activations: dict | None = None


@torch.no_grad()
def validate(
    model: RedHeart,
    data: EncodedData,
    split: str,
    *,
    tasks: dict[str, TaskSpec],
    task_weights: dict[str, float],
    fusion_weights: dict[str, float],
    device: torch.device,
    batch_size: int = 256,
    autocast_dtype: torch.dtype | None = None,
    placement=None,
    collect_activations: bool = False,
) -> ValidationResult:
    """Every module's own loss and metric on a real split, in one pass (the table the sweet-spot analysis reads).

    ``placement``: a streaming one runs the units outer (each visits the device
    once per pass); without one the model must already be on ``device``.
    """
    activations = ActivationStats() if collect_activations else None
    loss_sums: dict[str, float] = {}
    metric_acc: dict[str, list[float]] = {}
    fused_acc: dict[str, list[float]] = {}
    total, rows = 0.0, 0
    batches = list(iterate_batches(data, split, batch_size, shuffle=False, generator=None))
    outputs_of = predict_outputs(
        model, batches, device=device, autocast_dtype=autocast_dtype, placement=placement, record=activations
    )
    for batch, outputs in zip(batches, outputs_of, strict=True):
        batch = batch.to(device)
        losses = module_losses(outputs, batch.targets, batch.target_mask, tasks)
        bsz = len(batch)
        for m, v in losses.items():
            loss_sums[m] = loss_sums.get(m, 0.0) + v.item() * bsz
        total += total_loss(losses, task_weights).item() * bsz
        rows += bsz
        for m, out in outputs.items():
            task = MODULE_TASK[m]
            s, n = metric_sums(out, batch.targets[task], batch.target_mask[task], tasks[task])
            acc = metric_acc.setdefault(m, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(n)
        for task, pred in fuse(outputs, tasks, fusion_weights).items():
            s, n = metric_sums(pred, batch.targets[task], batch.target_mask[task], tasks[task])
            acc = fused_acc.setdefault(task, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(n)
    task_metric = {t: s / max(n, 1) for t, (s, n) in fused_acc.items()}
    return ValidationResult(
        loss=total / max(rows, 1),
        module_loss={m: v / max(rows, 1) for m, v in loss_sums.items()},
        module_metric={m: s / max(n, 1) for m, (s, n) in metric_acc.items()},
        task_metric=task_metric,
        accuracy=task_metric.get("emotion", float("nan")),
        activations=activations.result() if activations else None,
    )


def validate_state(
    state: TrainingState, data: EncodedData, split: str = "val", *, collect_activations: bool = False
) -> ValidationResult:
    """``validate`` with a training state's model, device, precision, placement and loss settings."""
    return validate(
        state.model,
        data,
        split,
        tasks=state.tasks,
        task_weights=state.task_weights,
        fusion_weights=state.fusion_weights,
        device=state.device,
        batch_size=state.eval_batch_size,
        autocast_dtype=state.autocast_dtype,
        placement=state.placement,
        collect_activations=collect_activations,
    )
