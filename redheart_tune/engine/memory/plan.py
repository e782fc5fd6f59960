"""The memory plan: which units stay on the GPU, which stream through it, and every turn's peak.

A *unit* is what the sweet-spot analysis selects and what moves between GPU and
CPU as one piece: a linked group (A, B, C) or one independent module
(``model.groups.selection_units``).  A unit's gradient depends only on its own
parameters and the cached encoder output, so an optimizer step can run
**units outer, micro-batches inner**: each unit has a *turn* in which it runs
forward and backward over all ``grad_accum`` micro-batches and then steps its
own AdamW.  A streamed unit is on the GPU for its turn only.

Bytes per parameter (fp32 master weights, as autocast keeps them):

    weights 4, gradients 4 (only during the unit's turn), AdamW moments 8,
    and under bf16/fp16 autocast a 2-byte cast of each weight during forward/backward.

Peak of a turn (allocator bytes), with R the resident units:

    sum over R of (weights + moments)                       always there
    + the unit's gradients, casts and activations
    + for a streamed unit: its weights, and its moments either whole ("with_unit")
      or, where that does not fit, shard by shard through the optimizer step
      ("sharded": the shard stepping and the next one arriving, never beside the activations)
    + the bytes of later streamed units being prefetched during this turn
    + the bytes of the previous streamed unit still going home during this turn ("drain")
    (AdamW's step comes once the activations are gone, and fused it updates in place: no temporary).

The planner keeps units resident by descending swap priority (first fit: a unit
that does not fit is streamed, and smaller units of lower priority may still be
kept) while every turn's peak stays within ``target * budget - context``.
Activations are estimated on the meta device from the tensors autograd saves for
backward (no weights are allocated); the GPU run measures the real figures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from redheart_tune.engine.memory.sizes import MOMENT_BYTES, WEIGHT_BYTES, UnitSize, moment_window_bytes, size
from redheart_tune.model.groups import NEVER_SWAPPED


class PlanError(RuntimeError):
    """No placement fits the budget; the message gives the numbers and what to change."""


@dataclass(frozen=True)
class UnitPlacement:
    """Where one unit lives and what its turn costs."""

    name: str
    priority: int
    numel: int
    resident: bool
    moments: Literal["resident", "with_unit", "sharded"]
    """'resident': on the GPU for good; 'with_unit': they move in and out with the streamed weights;
    'sharded': they pass through the optimizer step shard by shard."""
    prefetch_at: str | None
    """The turn during which its bytes start coming in on a side stream (None: at its own turn)."""
    drain_in: str | None
    """The turn during which its copy home runs beside the compute (its device memory is freed at that
    turn's end); None: the compute stream waits for the copy at the end of its own turn."""
    turn_peak: int
    """Estimated allocator bytes at the peak of this unit's turn."""
    pass_batches: int
    """Micro-batches of the window its forward and backward take at once."""
    checkpoint: bool
    """Activation checkpointing inside the unit during its turn."""
    moved_bytes: int
    """Bytes copied between CPU and GPU per optimizer step, both directions (0 when resident)."""


@dataclass(frozen=True)
class PlanSettings:
    """What a plan is made for: the budget, the precision's casts, the moment shards, prefetch."""

    requested: str
    """memory.strategy: 'auto' | 'resident' | 'stream'."""
    device: Literal["cuda", "accounting", "cpu"]
    """'cuda': a GPU budget; 'accounting': bytes counted against the budget on a CPU-only trial;
    'cpu': no device memory to manage (everything resident, nothing counted)."""
    budget_bytes: int
    target: float
    context_bytes: int
    cast_bytes: int
    """Bytes per parameter of autocast's weight casts (2 under bf16/fp16, 0 in fp32)."""
    shard_bytes: int
    prefetch: bool
    always_shard: bool = False

    @property
    def limit_bytes(self) -> int:
        """Allocator bytes a plan may use: target x budget, less the CUDA context."""
        return int(self.target * self.budget_bytes) - self.context_bytes


@dataclass(frozen=True)
class MemoryPlan(PlanSettings):
    strategy: Literal["resident", "stream"] = "resident"
    units: tuple[UnitPlacement, ...] = ()
    """In turn order: resident units first, then streamed ones, each by descending priority."""
    resident_peak: int = 0
    """Estimated peak with everything resident (micro-batches outer), for comparison."""

    @property
    def peak_bytes(self) -> int:
        """The plan's estimated allocator peak (CUDA context not included)."""
        return max(u.turn_peak for u in self.units)

    def pass_batches(self, unit: str) -> int:
        """Micro-batches of the window that ``unit``'s forward and backward take at once."""
        return self.unit(unit).pass_batches

    @property
    def transfer_bytes_per_step(self) -> int:
        return sum(u.moved_bytes for u in self.units)

    @property
    def waited_bytes_per_step(self) -> int:
        """Of ``transfer_bytes_per_step``, the bytes whose copy the compute stream waits for, beside no
        turn's compute: a streamed unit's bytes where they are not prefetched, its copy home where it
        does not drain beside the next turn, and moments passing shard by shard through the step (each
        shard's step is one short kernel, so their copies are waited for in all but name).  Bytes, not
        time: copies in and copies out run at once, each way on its own stream."""
        total = 0
        for u in self.units:
            if u.resident:
                continue
            weights, moments = WEIGHT_BYTES * u.numel, MOMENT_BYTES * u.numel
            carried = weights + (moments if u.moments == "with_unit" else 0)
            total += carried * ((u.prefetch_at is None) + (u.drain_in is None))
            if u.moments == "sharded":
                total += 2 * moments
        return total

    @property
    def resident(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.units if u.resident)

    @property
    def streamed(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.units if not u.resident)

    def unit(self, name: str) -> UnitPlacement:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(f"unit {name!r} is not in the plan")


# ---------------------------------------------------------------------------
# Placement


def _turn_order(sizes: Sequence[UnitSize], resident: set[str]) -> list[UnitSize]:
    ranked = sorted(sizes, key=lambda s: -s.priority)  # stable: declaration order within a priority
    return [s for s in ranked if s.name in resident] + [s for s in ranked if s.name not in resident]


def place(sizes: Sequence[UnitSize], resident: set[str], settings: PlanSettings) -> tuple[UnitPlacement, ...]:
    """Turn peaks for a given resident set; each streamed unit takes the cheapest way that fits.

    A streamed unit keeps its moments with it where its turn fits, else shards them.
    Its bytes are prefetched from the earliest turn after which every turn up to its
    own still fits (the link then has the longest time to carry them), but never
    before the previous streamed unit's, so units arrive in the order they are
    needed.  Turns that fit no way are returned with their (over-limit) peak; the
    caller decides.
    """
    limit, cast_bytes, shard_bytes = settings.limit_bytes, settings.cast_bytes, settings.shard_bytes
    order = _turn_order(sizes, resident)
    base = sum(s.weights + s.moments for s in order if s.name in resident)

    def working(s: UnitSize, moments: str) -> int:
        """Bytes on the device during the unit's own turn, besides the resident base.

        Activations and weight casts live during forward and backward; AdamW's step
        comes after them and, fused, updates in place: it needs no temporary (where
        ``foreach`` allocated 4 bytes per parameter it updates), so the turn's peak is
        the larger of the compute and the moment shards passing through.
        """
        grads, compute = s.weights, cast_bytes * s.numel + s.pass_activation_bytes
        if moments == "resident":
            return grads + compute
        if moments == "with_unit":
            return s.weights + s.moments + grads + compute
        return s.weights + grads + max(compute, moment_window_bytes(s.param_numels, shard_bytes))

    modes: dict[str, str] = {}
    for s in order:
        if s.name in resident:
            modes[s.name] = "resident"
        else:
            whole = base + working(s, "with_unit")
            modes[s.name] = "with_unit" if whole <= limit and not settings.always_shard else "sharded"

    def incoming(s: UnitSize) -> int:
        """What a prefetch of ``s`` puts on the device ahead of its turn."""
        return s.weights + (s.moments if modes[s.name] == "with_unit" else 0)

    peaks = [base + working(s, modes[s.name]) for s in order]
    starts: list[int | None] = [None] * len(order)
    earliest = 0  # a prefetch starts no earlier than the previous streamed unit's
    for i, s in enumerate(order):
        if s.name in resident:
            continue
        j = i
        while settings.prefetch and j > earliest and peaks[j - 1] + incoming(s) <= limit:
            j -= 1
        if j < i:
            for k in range(j, i):
                peaks[k] += incoming(s)
            starts[i] = j
        earliest = j
    # A streamed unit's copy home runs during the next turn where that turn still fits with it (the
    # compute does not wait for it); the last turn's, and one that does not fit, is waited for.  Not
    # beside a sharded turn: its moment shards go home on the same stream, behind the drain, and the
    # compute waits for each of them.
    drains: list[str | None] = [None] * len(order)
    for i, s in enumerate(order[:-1]):
        nxt = order[i + 1]
        if (
            s.name not in resident
            and settings.prefetch
            and modes[nxt.name] != "sharded"
            and peaks[i + 1] + incoming(s) <= limit
        ):
            peaks[i + 1] += incoming(s)
            drains[i] = order[i + 1].name
    return tuple(
        UnitPlacement(
            name=s.name,
            priority=s.priority,
            numel=s.numel,
            resident=s.name in resident,
            moments=modes[s.name],  # type: ignore[arg-type]
            prefetch_at=None if starts[i] is None else order[starts[i]].name,
            drain_in=drains[i],
            turn_peak=peaks[i],
            pass_batches=s.pass_batches,
            checkpoint=s.checkpoint,
            moved_bytes=0 if s.name in resident else 2 * (s.weights + s.moments),
        )
        for i, s in enumerate(order)
    )


def resident_peak(sizes: Sequence[UnitSize], cast_bytes: int) -> int:
    """Everything on the device: all weights and moments, plus the largest turn's gradients, casts and
    activations: units take their turns one after another in either strategy, and a unit's gradients
    are gone once it has stepped (in place: fused AdamW allocates nothing)."""
    state = sum(s.weights + s.moments for s in sizes)
    return state + max(s.weights + cast_bytes * s.numel + s.pass_activation_bytes for s in sizes)


def pass_candidates(window: int, requested: int | None) -> list[int]:
    """Micro-batches per pass to try, largest first: ``requested`` alone, else ``window`` and its halves."""
    if requested:
        return [requested]
    out = [window]
    while out[-1] > 1:
        out.append((out[-1] + 1) // 2)
    return out


def with_passes(
    sizes: Sequence[UnitSize], passes: dict[str, int], checkpoint: set[str] = frozenset()
) -> tuple[UnitSize, ...]:
    return tuple(
        dataclasses.replace(s, pass_batches=passes[s.name], checkpoint=s.name in checkpoint) for s in sizes
    )


def make_plan(
    sizes: Sequence[UnitSize], settings: PlanSettings, *, window: int = 1, requested_pass: int | None = None
) -> MemoryPlan:
    """The plan for ``settings.requested`` ('auto' | 'resident' | 'stream'); PlanError when nothing fits.

    Each unit also gets how many of the window's ``window`` micro-batches its forward and
    backward take at once: the most that fits its turn (``requested_pass`` when given).
    Fewer, larger passes launch fewer kernels; the plan first gives every unit the
    largest pass that fits beside the units that are never swapped, then keeps resident
    whatever still fits.
    """
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(PlanSettings)}
    limit = settings.limit_bytes
    candidates = pass_candidates(window, requested_pass)
    biggest = with_passes(sizes, {s.name: candidates[0] for s in sizes})
    peak_all = resident_peak(biggest, settings.cast_bytes)

    def plan(strategy: str, units: tuple[UnitPlacement, ...]) -> MemoryPlan:
        return MemoryPlan(**fields, strategy=strategy, units=units, resident_peak=peak_all)

    everything = {s.name for s in sizes}
    no_prefetch = dataclasses.replace(settings, prefetch=False)
    if settings.device == "cpu":
        return plan("resident", place(biggest, everything, no_prefetch))
    if settings.requested == "resident" or (settings.requested == "auto" and peak_all <= limit):
        for k in candidates:
            sized = with_passes(sizes, {s.name: k for s in sizes})
            if resident_peak(sized, settings.cast_bytes) <= limit:
                return plan("resident", place(sized, everything, no_prefetch))
        raise PlanError(
            _no_fit(
                plan("resident", place(sized, everything, no_prefetch)),
                "memory.strategy=resident does not fit",
            )
            + "\n  memory.strategy=stream (or auto) streams what does not fit."
        )

    def fits(placements: tuple[UnitPlacement, ...]) -> bool:
        return all(u.turn_peak <= limit for u in placements)

    resident = {s.name for s in sizes if s.priority >= NEVER_SWAPPED}
    passes = {s.name: candidates[-1] for s in sizes}
    checkpointed: set[str] = set()
    placements = place(with_passes(sizes, passes), resident, settings)
    if not fits(placements):  # the smallest pass, checkpointed where a unit can be
        checkpointed = {s.name for s in sizes if s.checkpointed_activation_bytes}
        placements = place(with_passes(sizes, passes, checkpointed), resident, settings)
    if not fits(placements):
        raise PlanError(
            _no_fit(
                plan("stream", placements), "even with every swappable unit streamed, a turn does not fit"
            )
        )
    for s in sorted(sizes, key=lambda s: -s.activation_bytes):
        # The largest pass that fits, without checkpointing where that fits the same pass.
        options = [
            (k, ck) for k in candidates for ck in (False, True) if not ck or s.checkpointed_activation_bytes
        ]
        for k, ck in options:
            if (k, ck) == (passes[s.name], s.name in checkpointed):
                break  # what it has already fits
            chosen = checkpointed | {s.name} if ck else checkpointed - {s.name}
            trial = place(with_passes(sizes, {**passes, s.name: k}, chosen), resident, settings)
            if fits(trial):
                passes[s.name], checkpointed, placements = k, chosen, trial
                break
    sized = with_passes(sizes, passes, checkpointed)
    for s in sorted(sized, key=lambda s: -s.priority):
        if s.name in resident:
            continue
        trial = place(sized, resident | {s.name}, settings)
        if fits(trial):
            resident.add(s.name)
            placements = trial
    return plan("stream", placements)


def replan(plan: MemoryPlan, sizes: Sequence[UnitSize], resident: set[str]) -> MemoryPlan:
    """The same budget with another resident set (the run-time swap manager's moves), streamed."""
    units = place(sizes, resident, plan)
    # Once the swap manager has moved anything, steps run units outer for good: the resident shape
    # (micro-batches outer) holds every unit's gradients at once, which is what overflowed.
    return dataclasses.replace(plan, units=units, strategy="stream")


def _no_fit(plan: MemoryPlan, why: str) -> str:
    over = [u for u in plan.units if u.turn_peak > plan.limit_bytes] or list(plan.units)
    worst = max(over, key=lambda u: u.turn_peak)
    return (
        f"memory plan: {why}.\n"
        f"  budget {size(plan.budget_bytes)} x target {plan.target} = "
        f"{size(plan.target * plan.budget_bytes)}, less {size(plan.context_bytes)} of CUDA "
        f"context: {size(plan.limit_bytes)} for tensors.\n"
        f"  {worst.name} ({worst.numel / 1e6:.1f}M parameters) needs {size(worst.turn_peak)} during "
        f"its turn ({plan.strategy}; resident: {', '.join(plan.resident) or 'none'}).\n"
        "  What to change: optim.batch_size=2 optim.grad_accum=32 (same effective "
        "batch, half the activations); a larger memory.gpu_budget_gb on a larger card; "
        "memory.shard_mb=64 (smaller moment shards)."
    )


def format_plan(plan: MemoryPlan) -> str:
    """The plan as the table ``run.py params`` prints."""
    head = {
        "cuda": f"GPU budget {size(plan.budget_bytes)}",
        "accounting": f"byte-accounting budget {size(plan.budget_bytes)} (CPU-only trial)",
        "cpu": "CPU trial: no device memory to manage",
    }[plan.device]
    lines = [
        f"memory plan: strategy {plan.strategy} (requested {plan.requested}); {head}",
        f"  limit: target {plan.target} x budget - context {size(plan.context_bytes)} = "
        f"{size(plan.limit_bytes)} for tensors; autocast casts {plan.cast_bytes} B/param",
        f"  everything resident would peak at {size(plan.resident_peak)} "
        f"({'fits' if plan.resident_peak <= plan.limit_bytes else 'does NOT fit'})",
    ]
    if plan.strategy == "resident":
        lines.append(
            f"  each unit's forward and backward take {plan.units[0].pass_batches} micro-batch(es) at once"
        )
    if plan.strategy == "stream":
        lines += [
            "",
            f"  {'turn':<18} {'priority':>8} {'params':>9}  {'placement':<9} {'moments':<9} "
            f"{'prefetch from':<16} {'home during':<16} {'turn peak':>10} {'moved/step':>10} {'pass':>5}",
        ]
        for u in plan.units:
            lines.append(
                f"  {u.name:<18} {u.priority:>8} {u.numel / 1e6:>8.2f}M  {'resident' if u.resident else 'streamed':<9} "
                f"{u.moments:<9} {u.prefetch_at or '-':<16} {u.drain_in or '-':<16} {size(u.turn_peak):>10} "
                f"{size(u.moved_bytes):>10} "
                f"{u.pass_batches:>5}{' (checkpointed)' if u.checkpoint else ''}"
            )
        total = plan.peak_bytes + plan.context_bytes
        lines += [
            "",
            f"  resident: {', '.join(plan.resident) or 'none'}",
            f"  streamed: {', '.join(plan.streamed) or 'none'}",
            f"  estimated peak {size(plan.peak_bytes)} + context {size(plan.context_bytes)} = {size(total)} "
            f"= {100 * total / plan.budget_bytes:.0f} % of the {size(plan.budget_bytes)} budget",
            f"  moved per optimizer step: {size(plan.transfer_bytes_per_step)} "
            "(each streamed unit's weights and AdamW moments in and out once; gradients never move)",
            f"  of which beside no turn's compute: {size(plan.waited_bytes_per_step)} (not prefetched, not "
            "draining home, or moment shards through the optimizer step)",
        ]
    return "\n".join(lines)
