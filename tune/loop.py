"""One explicit training loop in plain PyTorch: no Ray here, so tests and benchmarks can call it bare.

state = build_training(cfg, data, lr, epochs, device)
for epoch in range(1, epochs + 1):
    train_stats = train_epoch(state, data, epoch)
    val = validate(state.model, data, "val", ...)
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from model.family import RedHeart, build_model, fuse
from model.groups import GROUP_OF, GROUPS, MODULE_TASK, param_prefix_owner
from model.losses import metric_sums, module_losses, total_loss
from model.tasks import TaskSpec
from tune.config import Config
from tune.data import Batch, EncodedData, iterate_batches, num_batches


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or Inf; the message names the epoch, step and module(s)."""


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


# ---------------------------------------------------------------------------
# Training state


@dataclass
class TrainingState:
    """Everything a resume must restore, plus what the loop needs to run."""

    model: RedHeart
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # the data order; saved and restored for exact resume
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: fp32
    tasks: dict[str, TaskSpec]
    task_weights: dict[str, float]
    fusion_weights: dict[str, float]
    batch_size: int
    grad_accum: int
    grad_clip: float
    steps_per_epoch: int
    extra: dict = field(default_factory=dict)


def choose_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA where supported else fp16; None (fp32) on CPU."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups derived from the group declaration: one per module group,
    each split into decayed (matrices) and undecayed (biases, norms, 1-d) parameters."""
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        group = GROUP_OF[param_prefix_owner(name)]
        decay = p.ndim >= 2
        buckets.setdefault((group, decay), []).append(p)
    out = []
    for group in GROUPS:
        for decay in (True, False):
            params = buckets.get((group, decay))
            if params:
                out.append(
                    {
                        "params": params,
                        "weight_decay": weight_decay if decay else 0.0,
                        "name": f"{group}/{'decay' if decay else 'no_decay'}",
                    }
                )
    return out


def build_training(
    cfg: Config, data: EncodedData, lr: float, epochs: int, device: torch.device
) -> TrainingState:
    """Model, AdamW, schedule and scaler for ``epochs`` epochs at peak LR ``lr``; seeds everything first."""
    seed_everything(cfg.run.seed)
    model = build_model(cfg.model, data.tasks, data.input_dim).to(device)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, cfg.optim.weight_decay), lr=lr)
    batches = num_batches(data, "train", cfg.optim.batch_size)
    steps_per_epoch = math.ceil(batches / cfg.optim.grad_accum)
    total = steps_per_epoch * epochs
    warmup = max(1, round(cfg.optim.warmup_ratio * total)) if cfg.optim.warmup_ratio > 0 else 0
    cycle = max(1, cfg.optim.cycle_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=warmup, cycle_steps=cycle, min_ratio=cfg.optim.min_lr_ratio)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    dtype = choose_precision(cfg.optim.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    return TrainingState(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        generator=generator,
        device=device,
        autocast_dtype=dtype,
        tasks=data.tasks,
        task_weights=dict(cfg.optim.task_weights),
        fusion_weights=dict(cfg.model.fusion_weights),
        batch_size=cfg.optim.batch_size,
        grad_accum=cfg.optim.grad_accum,
        grad_clip=cfg.optim.grad_clip,
        steps_per_epoch=steps_per_epoch,
    )


def _autocast(state: TrainingState):
    if state.autocast_dtype is None:
        return torch.autocast(state.device.type, enabled=False)
    return torch.autocast(state.device.type, dtype=state.autocast_dtype)


def _check_finite(losses: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    bad = [m for m, v in losses.items() if not torch.isfinite(v).item()]
    if bad:
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, optimizer step {step}, in module(s): {', '.join(bad)}. "
            "Earlier checkpoints are intact; lower the LR (optim.lr / sweep), enable clipping "
            "(optim.grad_clip) or check the data, then resume."
        )


# ---------------------------------------------------------------------------
# Statistics


def grad_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per-parameter gradient statistics (mean, std, max, min, norm)."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.detach().float()
        out[name] = {
            "mean": g.mean().item(),
            "std": g.std().item() if g.numel() > 1 else 0.0,
            "max": g.max().item(),
            "min": g.min().item(),
            "norm": g.norm().item(),
        }
    return out


def weight_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per-parameter weight statistics (mean, std, norm, sparsity = share of |w| < 1e-6)."""
    out = {}
    for name, p in model.named_parameters():
        w = p.detach().float()
        out[name] = {
            "mean": w.mean().item(),
            "std": w.std().item() if w.numel() > 1 else 0.0,
            "norm": w.norm().item(),
            "sparsity": (w.abs() < 1e-6).float().mean().item(),
        }
    return out


class ActivationStats:
    """Forward hooks on every declared module: running mean, std and share of zeros of its outputs."""

    def __init__(self, model: RedHeart):
        self.sums: dict[str, list[float]] = {}  # module -> [n, sum, sum_sq, zeros]
        self.handles = [model.module(key).register_forward_hook(self._hook(key)) for key in MODULE_TASK]

    def _hook(self, key: str):
        def hook(_mod, _inp, output):
            if isinstance(output, dict):
                output = list(output.values())
            if not isinstance(output, tuple | list):
                output = [output]
            tensors = [t for t in output if torch.is_tensor(t)]
            acc = self.sums.setdefault(key, [0.0, 0.0, 0.0, 0.0])
            for t in tensors:
                t = t.detach().float()
                acc[0] += t.numel()
                acc[1] += t.sum().item()
                acc[2] += (t * t).sum().item()
                acc[3] += (t == 0).sum().item()

        return hook

    def result(self) -> dict[str, dict[str, float]]:
        out = {}
        for key, (n, s, sq, z) in self.sums.items():
            if n == 0:
                continue
            mean = s / n
            out[key] = {"mean": mean, "std": math.sqrt(max(sq / n - mean * mean, 0.0)), "zero_share": z / n}
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


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
    grad_norm: float  # mean global gradient norm over optimizer steps (before clipping)
    seconds: float
    lr: float  # LR at the last optimizer step of the epoch
    lrs: list[float]  # LR of every optimizer step (the schedule, visible)
    grad_stats: dict | None = None


def train_epoch(
    state: TrainingState, data: EncodedData, epoch: int, *, collect_grad_stats: bool = False
) -> EpochResult:
    """One pass over the training split with gradient accumulation, clipping and mixed precision."""
    model, opt = state.model, state.optimizer
    model.train()
    t0 = time.perf_counter()
    loss_sum, n_rows, correct, counted = 0.0, 0, 0.0, 0
    norms: list[float] = []
    lrs: list[float] = []
    stats = None
    total_batches = num_batches(data, "train", state.batch_size)
    opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(
        iterate_batches(data, "train", state.batch_size, shuffle=True, generator=state.generator)
    ):
        batch = batch.to(state.device)
        with _autocast(state):
            outputs = model(batch.tokens, batch.mask, batch.pooled)
        losses = module_losses(_float(outputs), batch.targets, batch.target_mask, state.tasks)
        step = i // state.grad_accum  # optimizer step within the epoch (0-based)
        _check_finite(losses, epoch, step + 1)
        loss = total_loss(losses, state.task_weights)
        # Each micro-batch weighs by its share of the accumulation window, so a short last window is not overweighted.
        window = min(state.grad_accum, total_batches - step * state.grad_accum)
        state.scaler.scale(loss / window).backward()
        bsz = batch.pooled.shape[0]
        loss_sum += loss.item() * bsz
        n_rows += bsz
        c, n = _headline_correct(outputs, batch, state)
        correct += c
        counted += n
        if (i + 1) % state.grad_accum == 0 or i + 1 == total_batches:
            state.scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), state.grad_clip if state.grad_clip > 0 else float("inf")
            )
            if not torch.isfinite(norm) and state.autocast_dtype != torch.float16:
                raise NonFiniteLossError(
                    f"non-finite gradient norm at epoch {epoch}, optimizer step {step + 1}; "
                    "lower the LR or enable clipping, then resume."
                )
            norms.append(norm.item())
            if collect_grad_stats and i + 1 == total_batches:
                stats = grad_stats(model)
            lrs.append(opt.param_groups[0]["lr"])
            state.scaler.step(opt)
            state.scaler.update()
            state.scheduler.step()
            opt.zero_grad(set_to_none=True)
    return EpochResult(
        loss=loss_sum / max(n_rows, 1),
        accuracy=correct / max(counted, 1),
        grad_norm=float(np.mean(norms)) if norms else 0.0,
        seconds=time.perf_counter() - t0,
        lr=lrs[-1] if lrs else opt.param_groups[0]["lr"],
        lrs=lrs,
        grad_stats=stats,
    )


def _float(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Losses in fp32 even under autocast: bf16 log-softmax and MSE lose too much precision."""
    return {k: v.float() for k, v in outputs.items()}


def _headline_correct(outputs, batch: Batch, state: TrainingState) -> tuple[float, int]:
    spec = state.tasks["emotion"]
    with torch.no_grad():
        fused = fuse(_float(outputs), state.tasks, state.fusion_weights)
        s, n = metric_sums(fused["emotion"], batch.targets["emotion"], batch.target_mask["emotion"], spec)
    return float(s), int(n)


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
    collect_activations: bool = False,
) -> ValidationResult:
    """Every module's own loss and metric on a real split, in one pass (the table the sweet-spot analysis reads)."""
    model.eval()
    hooks = ActivationStats(model) if collect_activations else None
    loss_sums: dict[str, float] = {}
    metric_acc: dict[str, list[float]] = {}
    fused_acc: dict[str, list[float]] = {}
    total, rows = 0.0, 0
    try:
        for batch in iterate_batches(data, split, batch_size, shuffle=False, generator=None):
            batch = batch.to(device)
            ctx = (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype
                else torch.autocast(device.type, enabled=False)
            )
            with ctx:
                outputs = model(batch.tokens, batch.mask, batch.pooled)
            outputs = _float(outputs)
            losses = module_losses(outputs, batch.targets, batch.target_mask, tasks)
            bsz = batch.pooled.shape[0]
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
    finally:
        activations = hooks.result() if hooks else None
        if hooks:
            hooks.close()
    task_metric = {t: s / max(n, 1) for t, (s, n) in fused_acc.items()}
    return ValidationResult(
        loss=total / max(rows, 1),
        module_loss={m: v / max(rows, 1) for m, v in loss_sums.items()},
        module_metric={m: s / max(n, 1) for m, (s, n) in metric_acc.items()},
        task_metric=task_metric,
        accuracy=task_metric.get("emotion", float("nan")),
        activations=activations,
    )


def validate_state(
    state: TrainingState, data: EncodedData, split: str = "val", *, collect_activations: bool = False
) -> ValidationResult:
    """``validate`` with a training state's model, device, precision and loss settings."""
    return validate(
        state.model,
        data,
        split,
        tasks=state.tasks,
        task_weights=state.task_weights,
        fusion_weights=state.fusion_weights,
        device=state.device,
        autocast_dtype=state.autocast_dtype,
        collect_activations=collect_activations,
    )
