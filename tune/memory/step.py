"""One optimizer step and one prediction pass, with the weights wherever the placement keeps them.

Two shapes of the same step:

- **resident** (micro-batches outer): each micro-batch runs forward through every
  unit and backward once; then every unit steps its optimizer.
- **streamed** (units outer, micro-batches inner): each unit in turn comes to the
  device, runs forward and backward over all micro-batches of the window, steps
  its own AdamW and goes home (``Placement``).

They give the same weights, bit for bit on a CPU, because everything that could
tell them apart is made independent of the order of the work:

- dropout draws from a stream seeded by (run seed, epoch, micro-batch, unit), set
  before each unit's forward, so no unit consumes another's random numbers;
- a unit's loss is its modules' share of the total loss (the same weights, the
  same denominator), so backward hands each module the same gradient;
- each unit has its own AdamW and its own gradient clipping (``optim.grad_clip``
  bounds each unit's gradient norm, not the whole model's: a global norm would
  need every unit's gradient before any unit may step);
- the reported loss and accuracy are computed afterwards from detached values
  in the group declaration's module order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from model.family import Recorder, check_inputs, fuse
from model.groups import MODULE_TASK, MODULES, selection_units
from model.losses import module_losses, row_metric
from model.tasks import TaskSpec
from tune.data import Batch

if TYPE_CHECKING:
    from tune.loop import TrainingState

UNITS: tuple[str, ...] = tuple(u.name for u in selection_units())
UNIT_INDEX: dict[str, int] = {u: i for i, u in enumerate(UNITS)}
UNIT_MODULES: dict[str, tuple[str, ...]] = {u.name: u.modules for u in selection_units()}
PREDICTING: tuple[str, ...] = tuple(m for m in MODULES if MODULE_TASK[m] is not None)


class NonFiniteLossError(RuntimeError):
    """A loss or gradient became NaN or Inf; the message names the epoch, step and module(s) or unit(s)."""


def dropout_seed(seed: int, epoch: int, batch: int, unit: str) -> int:
    """The seed of one unit's dropout on one micro-batch: the same whatever order the units run in."""
    state = np.random.SeedSequence([seed, epoch, batch, UNIT_INDEX[unit]]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def loss_weights(task_weights: dict[str, float]) -> dict[str, float]:
    """Each predicting module's share of the total loss (``model.losses.total_loss``'s weighting)."""
    raw = {m: task_weights.get(MODULE_TASK[m], 1.0) for m in PREDICTING}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"task weights sum to zero: {task_weights}")
    return {m: w / total for m, w in raw.items()}


def weighted_loss(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Sum of ``weights[m] * losses[m]`` over the predicting modules present (the backbone's is a report)."""
    return sum(weights[m] * losses[m] for m in PREDICTING if m in losses)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def unit_params(model: nn.Module, unit: str) -> list[nn.Parameter]:
    return [p for m in UNIT_MODULES[unit] for p in model.get_submodule(m).parameters()]


# ---------------------------------------------------------------------------
# The step


@dataclass
class Window:
    """The micro-batches of one optimizer step."""

    epoch: int
    step: int  # optimizer step within the epoch, from 1
    first_batch: int  # index of the first micro-batch within the epoch
    batches: list[Batch]  # on the CPU
    collect_grad_stats: bool = False


@dataclass
class StepResult:
    module_losses: np.ndarray  # (micro-batches, len(PREDICTING) + 1): every module's loss, "backbone" last
    rows: list[int]  # rows per micro-batch
    correct: float  # fused emotion predictions matching the majority class, over the window
    counted: int
    unit_norms: dict[str, float]  # gradient norm of each unit before clipping
    skipped: list[str]  # units whose fp16 gradients overflowed (no step this time)
    grad_stats: dict | None


LOSS_COLUMNS: tuple[str, ...] = (*PREDICTING, "backbone")


def _forward(state: TrainingState, unit: str, batch: Batch, index: int, epoch: int, record=None):
    torch.manual_seed(dropout_seed(state.seed, epoch, index, unit))
    with autocast(state.device, state.autocast_dtype):
        return state.model.forward_unit(unit, batch.tokens, batch.mask, batch.pooled, record)


def _losses(state: TrainingState, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
    return module_losses(
        {k: v.float() for k, v in outputs.items()}, batch.targets, batch.target_mask, state.tasks
    )


def _headline(state: TrainingState, outputs: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """(correct, counted) of the fused emotion prediction, as a tensor (no device sync)."""
    ordered = {m: outputs[m].float() for m in MODULES if m in outputs and MODULE_TASK[m] == "emotion"}
    pred = fuse(ordered, state.tasks, state.fusion_weights)["emotion"]  # (B, C)
    spec: TaskSpec = state.tasks["emotion"]
    target, mask = batch.targets["emotion"], batch.target_mask["emotion"]
    hit = row_metric(pred, target, spec) * mask
    return torch.stack([hit.sum(), mask.sum().float()])


def _step_unit(state: TrainingState, unit: str, window: Window, stats: dict | None) -> torch.Tensor:
    """Unscale, clip and step one unit's AdamW; returns its gradient norm before clipping."""
    opt = state.optimizers[unit]
    params = unit_params(state.model, unit)
    state.scaler.unscale_(opt)
    clip = state.grad_clip if state.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    if state.scaler.is_enabled() and not bool(torch.isfinite(norm)):
        # fp16: overflowed gradients skip this unit's step; the scaler lowers its scale at update().
        opt.zero_grad(set_to_none=True)
        return norm
    if stats is not None:
        stats.update(grad_stats(state, params))
    state.placement.step_unit(unit, opt)
    opt.zero_grad(set_to_none=True)
    return norm


def grad_stats(state: TrainingState, params: Sequence[nn.Parameter]) -> dict[str, dict[str, float]]:
    """Per-parameter gradient statistics (mean, std, max, min, norm) after clipping."""
    out = {}
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.detach().float()
        values = torch.stack(
            [g.mean(), g.std() if g.numel() > 1 else g.new_zeros(()), g.max(), g.min(), g.norm()]
        ).tolist()
        out[state.param_names[p]] = dict(zip(("mean", "std", "max", "min", "norm"), values, strict=True))
    return out


def train_step(state: TrainingState, window: Window) -> StepResult:
    """One optimizer step over ``window``, resident or streamed as the placement says."""
    for b in window.batches:
        check_inputs(b.tokens, b.mask, b.pooled)  # on the CPU: no device sync
    placement = state.placement
    placement.start_step(window.epoch, window.step)
    n = len(window.batches)
    batches = [b.to(state.device, non_blocking=True) for b in window.batches]
    loss_rows: list[list[torch.Tensor | None]] = [[None] * len(LOSS_COLUMNS) for _ in batches]
    stats: dict | None = {} if window.collect_grad_stats else None
    norms: dict[str, torch.Tensor] = {}

    def keep(j: int, losses: dict[str, torch.Tensor]) -> None:
        for c, m in enumerate(LOSS_COLUMNS):
            if m in losses:
                loss_rows[j][c] = losses[m].detach()

    weights = state.loss_weights
    if not placement.streaming:
        outputs_of: list[dict[str, torch.Tensor]] = []
        for j, batch in enumerate(batches):
            outputs: dict[str, torch.Tensor] = {}
            for unit in UNITS:
                outputs.update(_forward(state, unit, batch, window.first_batch + j, window.epoch))
            losses = _losses(state, outputs, batch)
            keep(j, losses)
            state.scaler.scale(weighted_loss(losses, weights) / n).backward()
            outputs_of.append({m: o.detach() for m, o in outputs.items() if MODULE_TASK[m] == "emotion"})
            placement.note()
        for unit in UNITS:
            norms[unit] = _step_unit(state, unit, window, stats)
            placement.end_turn(unit)
    else:
        outputs_of = [{} for _ in batches]
        done: set[str] = set()
        while len(done) < len(UNITS):
            order = [u for u in placement.turn_order() if u not in done]
            unit = order[0]
            placement.begin_turn(unit, order[1:])
            for j, batch in enumerate(batches):
                outputs = _forward(state, unit, batch, window.first_batch + j, window.epoch)
                losses = _losses(state, outputs, batch)
                keep(j, losses)
                state.scaler.scale(weighted_loss(losses, weights) / n).backward()
                outputs_of[j].update(
                    {m: o.detach() for m, o in outputs.items() if MODULE_TASK[m] == "emotion"}
                )
                placement.note()
            norms[unit] = _step_unit(state, unit, window, stats)
            placement.end_turn(unit)
            done.add(unit)
    placement.end_step()
    state.scaler.update()
    # One transfer for every number of the step: losses, headline counts, norms.
    headline = torch.stack([_headline(state, outputs_of[j], batches[j]) for j in range(n)]).sum(0)
    flat = torch.cat(
        [
            torch.stack([torch.stack(row) for row in loss_rows]).flatten(),
            headline,
            torch.stack(list(norms.values())),
        ]
    ).cpu()
    k = n * len(LOSS_COLUMNS)
    matrix = flat[:k].view(n, len(LOSS_COLUMNS)).double().numpy()
    unit_norms = dict(zip(norms, flat[k + 2 :].tolist(), strict=True))
    _check_finite(matrix, unit_norms, window, skip_norms=state.scaler.is_enabled())
    return StepResult(
        module_losses=matrix,
        rows=[len(b) for b in window.batches],
        correct=float(flat[k]),
        counted=int(flat[k + 1]),
        unit_norms=unit_norms,
        skipped=[u for u, v in unit_norms.items() if not np.isfinite(v)] if state.scaler.is_enabled() else [],
        grad_stats=stats,
    )


def _check_finite(matrix: np.ndarray, norms: dict[str, float], window: Window, *, skip_norms: bool) -> None:
    bad = [LOSS_COLUMNS[c] for c in range(matrix.shape[1]) if not np.isfinite(matrix[:, c]).all()]
    if bad:
        raise NonFiniteLossError(
            f"non-finite loss at epoch {window.epoch}, optimizer step {window.step}, in module(s): "
            f"{', '.join(bad)}. Earlier checkpoints are intact: continue from the newest with a lower LR or "
            "clipping, python run.py resume <run dir>/train optim.lr=<lower> (or optim.grad_clip=1.0), or "
            "check the data."
        )
    bad = [u for u, v in norms.items() if not np.isfinite(v)]
    if bad and not skip_norms:
        raise NonFiniteLossError(
            f"non-finite gradient norm at epoch {window.epoch}, optimizer step {window.step}, in unit(s): "
            f"{', '.join(bad)}; continue with a lower LR or clipping: python run.py resume <run dir>/train "
            "optim.lr=<lower> (or optim.grad_clip=1.0)."
        )


def total_of(result: StepResult, weights: dict[str, float]) -> np.ndarray:
    """The total training loss of each micro-batch, from its module losses (the same in both step shapes)."""
    w = np.array([weights.get(m, 0.0) for m in LOSS_COLUMNS])
    return result.module_losses @ w


# ---------------------------------------------------------------------------
# Prediction (validation, evaluation)


class EvalMover:
    """Unit-by-unit evaluation of a model kept on the CPU (analysis): each unit's weights visit the
    device for its pass and are dropped after it (nothing to copy back)."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.streaming = device.type == "cuda"
        self._saved: list[torch.Tensor] = []

    def begin_eval(self, unit: str) -> None:
        if self.streaming:
            params = unit_params(self.model, unit)
            self._saved = [p.data for p in params]
            for p in params:
                p.data = p.data.to(self.device, non_blocking=True)

    def end_eval(self, unit: str) -> None:
        if self.streaming:
            for p, cpu in zip(unit_params(self.model, unit), self._saved, strict=True):
                p.data = cpu
            self._saved = []


def _pinned(batch: Batch) -> Batch:
    """A page-locked copy of a CPU batch."""
    out = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        out[f.name] = (
            {k: v.pin_memory() for k, v in value.items()} if isinstance(value, dict) else value.pin_memory()
        )
    return Batch(**out)


@torch.no_grad()
def predict_outputs(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    placement=None,
    record: Recorder | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Every module's float32 output for each of ``batches`` (CPU batches), in module order.

    With a streaming placement (``Placement`` or ``EvalMover``) the units run
    outer, each on the device for one pass over the batches; otherwise the batches
    run outer through the whole resident model.  The results are the same.
    """
    model.eval()
    outs: list[dict[str, torch.Tensor]] = [{} for _ in batches]
    for b in batches:
        check_inputs(b.tokens, b.mask, b.pooled)

    def run(unit: str, j: int, batch: Batch) -> None:
        with autocast(device, autocast_dtype):
            outs[j].update(model.forward_unit(unit, batch.tokens, batch.mask, batch.pooled, record))

    if placement is not None and placement.streaming:
        if device.type == "cuda":  # each batch goes to the device once per unit: page-locked, asynchronously
            batches = [_pinned(b) for b in batches]
        for unit in UNITS:
            placement.begin_eval(unit)
            for j, b in enumerate(batches):
                run(unit, j, b.to(device, non_blocking=True))
            placement.end_eval(unit)
    else:
        for j, b in enumerate(batches):
            b = b.to(device, non_blocking=True)
            for unit in UNITS:
                run(unit, j, b)
    return [{m: o[m].float() for m in MODULES if m in o} for o in outs]
