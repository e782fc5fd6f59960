"""One optimizer step and one prediction pass, with the weights wherever the placement keeps them.

Units outer: each unit in turn is on the device (resident, or streamed in by the
``Placement``), runs its forward and backward over the window's micro-batches in as
few passes as its turn fits (``Pass``: ``plan.unit(u).pass_batches`` micro-batches at
once, group_b's summaries checkpointed where the plan says), clips and steps its own
AdamW, and makes room for the next.  The resident and stream strategies run this same
loop and differ only in the moves, so they give the same weights bit for bit on a CPU:

- dropout draws from a stream seeded by (run seed, epoch, first micro-batch of the pass,
  unit), set before each unit's forward, so no unit consumes another's random numbers;
- each row's loss weighs as in its own micro-batch's mean (the same weights, the same
  denominator), so backward hands each module the gradient of the accumulated
  micro-batches whatever the pass size;
- each unit has its own AdamW and its own gradient clipping (``optim.grad_clip``
  bounds each unit's gradient norm, not the whole model's: a global norm would
  need every unit's gradient before any unit may step);
- the reported loss and accuracy are computed from detached values, per micro-batch.

Nothing in the step reads a device value back until its numbers are read once at the
end (``read_results``): losses are masked sums, the RNNs pack by CPU lengths.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from redheart_tune.data import Batch, concat_batches
from redheart_tune.model.family import Recorder, RedHeart, check_inputs, fuse
from redheart_tune.model.groups import GROUPS, MODULE_TASK, MODULES, UNIT_MODULES, UNITS
from redheart_tune.model.losses import masked_row_losses, row_metric
from redheart_tune.model.tasks import TaskSpec

if TYPE_CHECKING:
    from redheart_tune.engine.memory.placement import Placement


class TrainingState(Protocol):
    """What a step needs of the training state (``tune.loop.TrainingState`` is one)."""

    model: RedHeart
    optimizers: dict[str, torch.optim.Optimizer]  # one AdamW per unit
    placement: Placement
    scaler: torch.amp.GradScaler
    device: torch.device
    autocast_dtype: torch.dtype | None
    tasks: dict[str, TaskSpec]
    fusion_weights: dict[str, float]
    loss_weights: dict[str, float]
    grad_clip: float
    seed: int
    param_names: dict[nn.Parameter, str]
    pad_multiple: int
    max_tokens: int | None
    forwards: dict[str, UnitForward] | None  # compiled unit forwards (optim.compile), or None: eager

UNIT_INDEX: dict[str, int] = {u: i for i, u in enumerate(UNITS)}
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


@dataclass
class Pass:
    """Consecutive micro-batches of a window that go through one forward and one backward together.

    ``shares[task]`` (count, rows) is each row's weight in its own micro-batch's mean
    loss: 1 / (rows of that micro-batch with the task's target), 0 in the other
    micro-batches and where the target is missing.  So ``shares @ row_losses`` is the
    loss of each micro-batch, exactly as if it had run alone, and the pass's gradient
    is the sum of theirs: the micro-batch setting changes the speed, not the math.
    """

    batch: Batch  # on the device
    first: int  # index within the window of its first micro-batch
    count: int
    shares: dict[str, torch.Tensor]
    lengths: torch.Tensor  # (rows,) real tokens per row, on the CPU (the RNNs pack by them)


def make_passes(
    batches: Sequence[Batch],
    per_pass: int,
    device: torch.device,
    *,
    pad_multiple: int = 1,
    max_tokens: int | None = None,
) -> list[Pass]:
    """The window's CPU micro-batches, ``per_pass`` at a time, as passes on ``device`` (no device sync),
    each padded to a multiple of ``pad_multiple`` tokens (not past ``max_tokens``)."""
    passes = []
    for first in range(0, len(batches), per_pass):
        group = batches[first : first + per_pass]
        joined = concat_batches(group, multiple=pad_multiple, cap=max_tokens)
        sizes = torch.tensor([len(b) for b in group])
        member = (
            torch.arange(len(group)).repeat_interleave(sizes)[None, :] == torch.arange(len(group))[:, None]
        )
        shares = {}
        for task, mask in joined.target_mask.items():
            w = (member & mask[None, :]).float()  # (count, rows)
            shares[task] = (w / w.sum(1, keepdim=True).clamp(min=1)).to(device, non_blocking=True)
        passes.append(
            Pass(joined.to(device, non_blocking=True), first, len(group), shares, joined.mask.sum(1))
        )
    return passes


def seed_dropout(device: torch.device, seed: int) -> None:
    """Seed the generator that dropout on ``device`` draws from (and only that one)."""
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


UnitForward = Callable[..., dict[str, torch.Tensor]]
"""``RedHeart.forward_unit`` with its unit bound: (tokens, mask, pooled, lengths=, checkpoint=) -> outputs."""


def compiled_forwards(model: RedHeart) -> dict[str, UnitForward]:
    """Each unit's forward under ``torch.compile`` with static shapes (``optim.compile``); a turn whose
    plan checkpoints the unit runs it eagerly (``_forward``).

    Every unit runs the same code object (``RedHeart.forward_unit``) with its name as a guard, and
    each pass shape is its own entry too: ten units times a few shapes need more entries than
    Dynamo's default of 8 per code object, past which it would run the rest eagerly.
    """
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(config, limit, max(getattr(config, limit), 16 * len(UNITS)))
    return {u: torch.compile(functools.partial(model.forward_unit, u), dynamic=False) for u in UNITS}


def _forward(state: TrainingState, unit: str, p: Pass, index: int, epoch: int):
    seed_dropout(state.device, dropout_seed(state.seed, epoch, index, unit))
    checkpoint = state.placement.plan.unit(unit).checkpoint
    # A checkpointed unit runs eagerly: its backward recomputes the forward eagerly, and that must draw
    # the dropout masks the forward drew (compiled dropout draws its own).
    compiled = state.forwards is not None and not checkpoint
    forward = state.forwards[unit] if compiled else functools.partial(state.model.forward_unit, unit)
    with autocast(state.device, state.autocast_dtype):
        return forward(p.batch.tokens, p.batch.mask, p.batch.pooled, lengths=p.lengths, checkpoint=checkpoint)


HEADS: tuple[str, ...] = tuple(m for m in GROUPS["group_a"] if MODULE_TASK[m] is not None)
"""The modules whose mean loss is the backbone's (``model.losses.module_losses``)."""


def pass_losses(
    tasks: dict[str, TaskSpec], outputs: dict[str, torch.Tensor], p: Pass
) -> dict[str, torch.Tensor]:
    """Each module's loss on each micro-batch of the pass (count,), plus "backbone" (the heads' mean)."""
    losses = {}
    for module, pred in outputs.items():
        task = MODULE_TASK[module]
        rows = masked_row_losses(pred.float(), p.batch.targets[task], p.batch.target_mask[task], tasks[task])
        losses[module] = p.shares[task] @ rows
    if all(h in losses for h in HEADS):
        losses["backbone"] = torch.stack([losses[h] for h in HEADS]).mean(0)
    return losses


def _headline(
    state: TrainingState, outputs: dict[str, torch.Tensor], target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """(correct, counted) of the fused emotion prediction over the window, as a tensor (no device sync)."""
    ordered = {m: outputs[m].float() for m in MODULES if m in outputs and MODULE_TASK[m] == "emotion"}
    pred = fuse(ordered, state.tasks, state.fusion_weights)["emotion"]  # (B, C)
    spec: TaskSpec = state.tasks["emotion"]
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
    """One optimizer step over ``window``, resident or streamed as the placement says.

    Each unit takes the window's micro-batches ``plan.pass_batches(unit)`` at a time
    (``Pass``): one forward and one backward per pass.
    """
    for b in window.batches:
        check_inputs(b.tokens, b.mask, b.pooled)  # on the CPU: no device sync
    placement = state.placement
    placement.start_step(window.epoch, window.step)
    n = len(window.batches)
    plan = placement.plan
    passes_of: dict[int, list[Pass]] = {}  # by micro-batches per pass: units of one size share them
    for unit in UNITS:
        k = plan.pass_batches(unit)
        if k not in passes_of:
            passes_of[k] = make_passes(
                window.batches, k, state.device, pad_multiple=state.pad_multiple, max_tokens=state.max_tokens
            )
    # Per loss column, per micro-batch: the loss, detached (filled in as the units run).
    losses_of: dict[str, list[torch.Tensor]] = {}
    emotion_of: dict[str, list[torch.Tensor]] = {}  # each emotion module's outputs, pass by pass
    stats: dict | None = {} if window.collect_grad_stats else None
    norms: dict[str, torch.Tensor] = {}
    weights = state.loss_weights
    done: set[str] = set()
    while len(done) < len(UNITS):
        order = [u for u in placement.turn_order() if u not in done]
        unit = order[0]
        placement.begin_turn(unit, order[1:])
        k = plan.pass_batches(unit)
        parts: dict[str, list[torch.Tensor]] = {}
        for p in passes_of[k]:
            outputs = _forward(state, unit, p, window.first_batch + p.first, window.epoch)
            losses = pass_losses(state.tasks, outputs, p)
            objective = weighted_loss({m: v.sum() for m, v in losses.items()}, weights) / n
            state.scaler.scale(objective).backward()
            for m, v in losses.items():
                parts.setdefault(m, []).append(v.detach())
            for m, o in outputs.items():
                if MODULE_TASK[m] == "emotion":
                    emotion_of.setdefault(m, []).append(o.detach())
            placement.note()
        for m, vs in parts.items():
            losses_of[m] = torch.cat(vs)  # (n,)
        norms[unit] = _step_unit(state, unit, window, stats)
        placement.end_turn(unit)
        done.add(unit)
    placement.end_step()
    state.scaler.update()
    any_passes = next(iter(passes_of.values()))
    headline = _headline(
        state,
        {m: torch.cat(outs) for m, outs in emotion_of.items()},
        torch.cat([p.batch.targets["emotion"] for p in any_passes]),
        torch.cat([p.batch.target_mask["emotion"] for p in any_passes]),
    )
    matrix = torch.stack([losses_of[c] for c in LOSS_COLUMNS], dim=1)  # (n, columns)
    return read_results(state, window, matrix, headline, norms, stats)


def read_results(
    state: TrainingState,
    window: Window,
    matrix: torch.Tensor,
    headline: torch.Tensor,
    norms: dict[str, torch.Tensor],
    stats: dict | None,
) -> StepResult:
    """The step's numbers to the host in one transfer (the step's one wait for the device), checked."""
    n = matrix.shape[0]
    flat = torch.cat([matrix.flatten(), headline, torch.stack(list(norms.values()))]).cpu()
    k = n * len(LOSS_COLUMNS)
    losses = flat[:k].view(n, len(LOSS_COLUMNS)).double().numpy()
    unit_norms = dict(zip(norms, flat[k + 2 :].tolist(), strict=True))
    _check_finite(losses, unit_norms, window, skip_norms=state.scaler.is_enabled())
    return StepResult(
        module_losses=losses,
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

    lengths = [b.mask.sum(1) for b in batches]  # on the CPU, before the batches move

    def run(unit: str, j: int, batch: Batch) -> None:
        with autocast(device, autocast_dtype):
            outs[j].update(
                model.forward_unit(unit, batch.tokens, batch.mask, batch.pooled, record, lengths=lengths[j])
            )

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
