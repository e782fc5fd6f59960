"""Where each unit's weights and AdamW moments live, and the moves between the device and CPU.

A ``Placement`` follows a ``MemoryPlan``: resident units stay on the device;
streamed units live in CPU "home" buffers (one flat fp32 buffer each for weights,
exp_avg and exp_avg_sq; page-locked on a GPU machine, allocated once and reused)
and are copied in for their turn and out after their optimizer step.  While a
unit is out, its parameters and moment tensors are views of its home buffers, so
``model.state_dict()`` and ``optimizer.state_dict()`` still see every value.

On CUDA the copies run on two side streams, one per direction (the link carries
both at once): a unit's weights (and, where the plan says so, its moments) are
prefetched while earlier turns compute, and the compute stream waits on an event
before it touches them.  A unit's copy home runs beside the next turn where the
plan has room for it (``drain_in``): its device tensors are kept until the end of
that turn, when the compute stream waits for the copy's event and only then lets
them go, so the allocator never hands their memory out while the copy reads it.
Elsewhere the compute stream waits for a copy home at once.  A copy in of a unit's
home buffers waits for its last copy home.  On a CPU the same moves are plain
copies (a draining unit's buffers are kept and counted the same way), so the
tests exercise every move for real.

Every move is recorded (epoch, step, unit, action, bytes, seconds, memory before
and after) for the run's metrics and the DSM figure; ``accounted()`` is the bytes
of weights, gradients and moments the placement has put on the device (a
CPU-only trial's measure of use; a GPU's allocator measures itself).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from redheart_tune.engine.memory.budget import Budget, refresh_context
from redheart_tune.engine.memory.dsm import Candidate, SwapManager
from redheart_tune.engine.memory.plan import MemoryPlan, replan
from redheart_tune.engine.memory.sharded import sharded_step
from redheart_tune.engine.memory.sizes import MOMENT_BYTES, WEIGHT_BYTES, UnitSize
from redheart_tune.engine.memory.transfer import MOMENTS, Meter, Mover, PinError, Slot, page_locked
from redheart_tune.model.groups import selection_units

log = logging.getLogger(__name__)


class _Drain(NamedTuple):
    """A copy home running beside a turn: its event, the device tensors it reads (kept until the compute
    stream has waited for it), their bytes, and the turn the plan runs it beside."""

    event: object | None
    tensors: list[torch.Tensor]
    nbytes: int
    beside: str


class Placement:
    """Carries out a plan for one model and its per-unit optimizers, and runs the swap manager."""

    def __init__(
        self,
        model: nn.Module,
        optimizers: dict[str, torch.optim.Optimizer],
        plan: MemoryPlan,
        sizes: Sequence[UnitSize],
        device: torch.device,
        budget: Budget,
        *,
        pin_memory: bool = True,
        dsm: SwapManager | None = None,
    ):
        self.model, self.optimizers, self.plan, self.sizes = model, optimizers, plan, tuple(sizes)
        self.device, self.budget = device, budget
        self.pin = pin_memory and device.type == "cuda"
        self.mover = Mover(device)
        self.dsm = dsm
        self.slots: dict[str, Slot] = {}
        for unit in selection_units():
            placement = plan.unit(unit.name)
            params = [p for m in unit.modules for p in model.get_submodule(m).parameters()]
            self.slots[unit.name] = Slot(
                name=unit.name,
                priority=placement.priority,
                params=params,
                resident=placement.resident,
                moments_mode=placement.moments,
                prefetch_at=placement.prefetch_at,
                drain_in=placement.drain_in,
            )
        self.meter = Meter(device, self._on_device_bytes, lambda: self.budget.context_bytes)
        self._draining: list[_Drain] = []  # copies home running beside a turn
        self.home_bytes, self.home_s = 0, 0.0  # CPU home buffers allocated so far, and the time they took
        self._context_checked = device.type != "cuda"
        self._place_initially()

    # -- set-up --------------------------------------------------------------

    @property
    def streaming(self) -> bool:
        """Steps run units outer, micro-batches inner (the stream strategy, even while everything fits)."""
        return self.plan.strategy == "stream"

    @property
    def managed(self) -> bool:
        """Device memory is budgeted (a GPU, or byte accounting on a CPU-only trial)."""
        return self.plan.device in ("cuda", "accounting")

    def _place_initially(self) -> None:
        """The model was built on the CPU: resident units go to the device, streamed ones to home buffers."""
        for slot in self.slots.values():
            if slot.resident:
                for p in slot.params:
                    p.data = p.data.to(self.device)
                slot.on_device = True
                slot.moments_on_device = True
            else:
                slot.home = self._home_buffer(slot.numel)
                for view, p in zip(slot.views(slot.home), slot.params, strict=True):
                    view.copy_(p.data)
                    p.data = view
        self.meter.reset_peak()

    def _home_buffer(self, numel: int) -> torch.Tensor:
        """A CPU buffer for a streamed unit's weights or one moment, page-locked where ``pin``: allocated
        once per unit (its weights at set-up, its moments at its first step).  Counted in ``home_bytes``
        and ``home_s``: page-locking gigabytes takes seconds, paid in the first epoch."""
        t = time.perf_counter()
        try:
            return self._allocate_home(numel)
        finally:
            self.home_bytes += 4 * numel
            self.home_s += time.perf_counter() - t

    def _allocate_home(self, numel: int) -> torch.Tensor:
        if self.pin:
            try:
                return page_locked(numel)
            except PinError as exc:  # page-locking can fail when the OS limit is reached
                log.warning(
                    "cannot page-lock %.2f GiB of CPU memory (%s); using pageable memory",
                    4 * numel / 2**30,
                    exc,
                )
                self.pin = False
        return torch.empty(numel, dtype=torch.float32)

    # -- bookkeeping ---------------------------------------------------------

    def _on_device_bytes(self) -> int:
        """Bytes of weights, gradients and AdamW moments of the units on the device right now."""
        total = 0
        for slot in self.slots.values():
            if slot.on_device:
                total += WEIGHT_BYTES * slot.numel
                total += sum(
                    WEIGHT_BYTES * n
                    for n, p in zip(slot.sizes, slot.params, strict=True)
                    if p.grad is not None
                )
            if slot.moments_on_device and self._has_moments(slot):
                total += MOMENT_BYTES * slot.numel
        return total + sum(d.nbytes for d in self._draining)

    # the meter's record and measures, as the loop, the progress line and the benchmarks read them
    @property
    def moves(self):
        return self.meter.moves

    @property
    def trace(self) -> list[dict]:
        return self.meter.trace

    def accounted(self) -> int:
        """Bytes of weights, gradients and AdamW moments this placement has on the device right now."""
        return self.meter.accounted()

    def note(self) -> None:
        self.meter.note()

    def use_bytes(self) -> int:
        return self.meter.use_bytes()

    def take_peaks(self) -> dict[str, int]:
        return self.meter.take_peaks()

    def _has_moments(self, slot: Slot) -> bool:
        opt_state = self.optimizers[slot.name].state
        return bool(slot.params) and all(m in opt_state.get(p, {}) for p in slot.params for m in MOMENTS)

    # -- moves ---------------------------------------------------------------

    def _bring_in(self, slot: Slot, *, moments: bool, action: str) -> None:
        """Allocate the unit's device buffers and start copying its weights (and moments) in."""
        before = self.meter.now()
        slot.device_flat = torch.empty(slot.numel, dtype=torch.float32, device=self.device)
        pairs = [(slot.device_flat, slot.home)]
        nbytes = WEIGHT_BYTES * slot.numel
        move_moments = moments and self._has_moments(slot)
        if move_moments:
            pairs += self._moment_pairs_in(slot)
            nbytes += MOMENT_BYTES * slot.numel
        slot.ready, timing = self.mover.copy(pairs, "in", after=slot.sent)
        for view, p in zip(slot.views(slot.device_flat), slot.params, strict=True):
            p.data = view
        slot.on_device = True
        self.meter.record(slot.name, action, nbytes, before, timing)
        self.note()

    def _moment_pairs_in(self, slot: Slot) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Allocate the unit's device moment buffers, point AdamW's state at them, return the copies."""
        home = self._home_moments(slot)
        slot.device_moments = {
            m: torch.empty(slot.numel, dtype=torch.float32, device=self.device) for m in MOMENTS
        }
        self._point_moments(slot, slot.device_moments)
        slot.moments_on_device = True
        return [(slot.device_moments[m], home[m]) for m in MOMENTS]

    def _send_out(self, slot: Slot, *, action: str, copy_weights: bool = True, drain: bool = False) -> None:
        """Copy the unit's weights (and its moments, when they are on the device) home; free its device
        memory: at once (the compute stream waits for the copy), or with ``drain``, where the plan gives
        the unit a turn to drain beside (``drain_in``), once that turn is over (``_release_drained``)."""
        before = self.meter.now()
        if slot.home is None:
            slot.home = self._home_buffer(slot.numel)
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        nbytes = 0
        if copy_weights:
            if slot.device_flat is not None:  # one copy for a streamed unit's flat buffer
                pairs.append((slot.home, slot.device_flat))
            else:  # a resident unit's separately allocated parameters
                pairs += [(h, p.data) for h, p in zip(slot.views(slot.home), slot.params, strict=True)]
            nbytes += WEIGHT_BYTES * slot.numel
        move_moments = slot.moments_on_device and self._has_moments(slot)
        if move_moments:
            home = self._home_moments(slot)
            opt_state = self.optimizers[slot.name].state
            for m in MOMENTS:
                if slot.device_moments:
                    pairs.append((home[m], slot.device_moments[m]))
                else:  # created by AdamW on the device, one tensor per parameter
                    pairs += [
                        (h, opt_state[p][m]) for h, p in zip(slot.views(home[m]), slot.params, strict=True)
                    ]
            nbytes += MOMENT_BYTES * slot.numel
        event, timing = self.mover.copy(pairs, "out") if pairs else (None, 0.0)
        if drain and pairs and slot.drain_in is not None:
            # kept until the compute stream has waited for the copy: nothing can reuse them before
            self._draining.append(_Drain(event, [src for _, src in pairs], nbytes, slot.drain_in))
        else:  # the compute stream waits for the copy before anything can reuse the unit's device memory
            self.mover.wait(event)
        if pairs:
            slot.sent = event
        for view, p in zip(slot.views(slot.home), slot.params, strict=True):
            p.data = view
        if move_moments:
            self._point_moments(slot, self._home_moments(slot))
        slot.device_moments = {}
        slot.moments_on_device = False
        slot.device_flat = None
        slot.on_device = False
        slot.ready = None
        if pairs:
            self.meter.record(slot.name, action, nbytes, before, timing)

    def _release_drained(self, *, except_beside: str | None = None) -> None:
        """The compute stream waits for the copies home that ran beside the turn that just ended; their
        device tensors go (the allocator reuses their memory in the compute stream's order).
        ``except_beside``: keep those the plan runs beside that turn (one about to begin)."""
        keep = [d for d in self._draining if d.beside == except_beside]
        for d in self._draining:
            if d.beside != except_beside:
                self.mover.wait(d.event)
        self._draining = keep

    def _home_moments(self, slot: Slot) -> dict[str, torch.Tensor]:
        if not slot.home_moments:
            slot.home_moments = {m: self._home_buffer(slot.numel) for m in MOMENTS}
        return slot.home_moments

    def _point_moments(self, slot: Slot, flats: dict[str, torch.Tensor]) -> None:
        opt_state = self.optimizers[slot.name].state
        for m in MOMENTS:
            for view, p in zip(slot.views(flats[m]), slot.params, strict=True):
                opt_state[p][m] = view

    def adopt_loaded_state(self) -> None:
        """After ``optimizer.load_state_dict`` (resume): moments of units that are out go into their home
        buffers, and every ``step`` counter to the device, where fused AdamW reads it (the load put the
        counters of units that are out beside their weights, on the CPU)."""
        for slot in self.slots.values():
            opt_state = self.optimizers[slot.name].state
            for p in slot.params:
                if "step" in opt_state.get(p, {}):
                    opt_state[p]["step"] = opt_state[p]["step"].to(self.device)
            if slot.on_device or not self._has_moments(slot):
                continue
            home = self._home_moments(slot)
            opt_state = self.optimizers[slot.name].state
            for m in MOMENTS:
                for view, p in zip(slot.views(home[m]), slot.params, strict=True):
                    view.copy_(opt_state[p][m])
            self._point_moments(slot, home)

    def synchronize(self) -> None:
        """Wait for every copy in flight (before the CPU reads weights: checkpoints, statistics)."""
        self._release_drained()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- steps and turns -----------------------------------------------------

    def start_step(self, epoch: int, step: int) -> None:
        """A new optimizer step (1-based within the epoch) begins: moves are recorded under it."""
        self.meter.epoch, self.meter.step = epoch, step
        self.meter.step_peak = 0
        self.meter.reset_peak()

    def turn_order(self) -> list[str]:
        """Units in the order of this step's turns: resident ones first, then streamed, by priority."""
        order = [u.name for u in self.plan.units]
        return [n for n in order if self.slots[n].resident] + [n for n in order if not self.slots[n].resident]

    def begin_turn(self, unit: str, upcoming: Sequence[str] = ()) -> None:
        """Make ``unit`` usable on the device (moments too, where its plan keeps them with it), and start
        the prefetches the plan times for this turn."""
        # a copy home drains beside the turn the plan gave it; where the turns ran otherwise (a unit
        # the swap manager made resident mid-step has had its turn), it is waited for now
        self._release_drained(except_beside=unit)
        slot = self.slots[unit]
        wants_moments = slot.moments_mode == "with_unit"
        if not slot.on_device:
            self._bring_in(slot, moments=wants_moments, action="stream_in")
        elif not slot.resident and wants_moments and not slot.moments_on_device and self._has_moments(slot):
            # prefetched while the plan still sharded its moments; the swap manager has since made room
            before = self.meter.now()
            event, timing = self.mover.copy(self._moment_pairs_in(slot), "in", after=slot.sent)
            self.mover.wait(slot.ready)
            slot.ready = event
            self.meter.record(unit, "moments_in", MOMENT_BYTES * slot.numel, before, timing)
        self.mover.wait(slot.ready)
        slot.ready = None
        for name in upcoming:
            nxt = self.slots[name]
            if nxt.prefetch_at == unit and not nxt.resident and not nxt.on_device:
                self._bring_in(nxt, moments=nxt.moments_mode == "with_unit", action="stream_in")

    def step_unit(self, unit: str, optimizer: torch.optim.Optimizer) -> None:
        """The unit's optimizer step: whole where its moments are on the device (or yet to be created
        there), shard by shard where they are at home."""
        slot = self.slots[unit]
        at_home = not slot.moments_on_device and (slot.moments_mode == "sharded" or self._has_moments(slot))
        if slot.on_device and not slot.resident and at_home:
            first = not self._has_moments(slot)
            sharded_step(
                slot,
                optimizer,
                self._home_moments(slot),
                first=first,
                shard_bytes=self.plan.shard_bytes,
                device=self.device,
                mover=self.mover,
                meter=self.meter,
            )
            slot.moments_on_device = False
        else:
            optimizer.step()
            slot.moments_on_device = True  # moved in, or created there by this first step
            self.note()

    def end_turn(self, unit: str) -> None:
        """After the unit's optimizer step: send a streamed unit home, measure the turn's peak use,
        let the swap manager act (units-outer steps), and start measuring the next turn."""
        slot = self.slots[unit]
        self.note()
        if not self.managed:
            return
        use = self.use_bytes()
        self.meter.step_peak = max(self.meter.step_peak, use)
        self._release_drained()  # the previous unit's copy home ran beside this turn
        if not slot.resident:
            self._send_out(slot, action="stream_out", drain=True)
        self.trace.append({"epoch": self.meter.epoch, "step": self.meter.step, "unit": unit, "peak_bytes": use})
        if self.dsm is not None and self.streaming:
            self._swap_out_above_target(use)
        self.meter.reset_peak()

    def end_step(self) -> None:
        """Every unit has had its turn: the swap manager judges the whole step.

        A resident-shape step (micro-batches outer) holds every unit's gradients
        until the last unit has stepped, so nothing can move before now: its
        swap-outs are decided here, on the step's peak.  A unit is brought back
        only after a whole step of the placement it was swapped out of.  After the
        trial's first step the CUDA context is measured again (cuBLAS and cuDNN
        add to it lazily) and the cap follows.
        """
        self._release_drained()
        if not self._context_checked:
            self._context_checked = True
            self.budget = refresh_context(self.budget, self.device)
        if self.dsm is None or not self.managed:
            return
        if not self.streaming:
            self._swap_out_above_target(self.meter.step_peak)
            return
        if not self.dsm.swapped:
            return
        swapped = {n: Candidate(n, self.slots[n].priority, self._unit_bytes(n)) for n in self.dsm.swapped}
        back = self.dsm.to_bring_back(self.meter.step_peak / self.dsm.budget_bytes, swapped)
        if back is None:
            return
        slot = self.slots[back]
        self._bring_in(slot, moments=True, action="swap_in")
        self.mover.wait(slot.ready)
        slot.ready = None
        slot.resident = True
        self.dsm.swapped.remove(back)
        self._apply(replan(self.plan, self.sizes, self._resident_names()))

    # -- evaluation turns (weights only, nothing to copy back) ---------------

    def begin_eval(self, unit: str) -> None:
        self._release_drained()
        slot = self.slots[unit]
        if not slot.on_device:
            self._bring_in(slot, moments=False, action="eval_in")
        self.mover.wait(slot.ready)
        slot.ready = None

    def end_eval(self, unit: str) -> None:
        slot = self.slots[unit]
        if not slot.resident and slot.on_device:
            self._send_out(slot, action="eval_out", copy_weights=False)

    # -- the swap manager ----------------------------------------------------

    def _unit_bytes(self, name: str) -> int:
        return (WEIGHT_BYTES + MOMENT_BYTES) * self.slots[name].numel

    def _resident_names(self) -> set[str]:
        return {n for n, s in self.slots.items() if s.resident}

    def _swap_out_above_target(self, use_bytes: int) -> None:
        resident = [
            Candidate(s.name, s.priority, self._unit_bytes(s.name)) for s in self.slots.values() if s.resident
        ]
        out = self.dsm.to_swap_out(use_bytes / self.dsm.budget_bytes, resident)
        for name in out:
            slot = self.slots[name]
            slot.resident = False
            self._send_out(slot, action="swap_out")
            self.dsm.swapped.append(name)
        if out:
            self._apply(replan(self.plan, self.sizes, self._resident_names()))

    def _apply(self, plan: MemoryPlan) -> None:
        self.plan = plan
        for u in plan.units:
            slot = self.slots[u.name]
            slot.moments_mode, slot.prefetch_at, slot.drain_in = u.moments, u.prefetch_at, u.drain_in

    def restore(self, memory: dict) -> None:
        """Resume: the step shape and the swap manager's swap-outs as they were when the checkpoint was written."""
        swapped = list(memory.get("swapped", []))
        for name in swapped:
            slot = self.slots[name]
            if slot.resident:
                slot.resident = False
                self._send_out(slot, action="swap_out")
        if self.dsm is not None:
            self.dsm.swapped = swapped
        if swapped or (memory.get("strategy") == "stream" and not self.streaming):
            self._apply(replan(self.plan, self.sizes, self._resident_names()))
        self.moves.clear()

    def state_dict(self) -> dict:
        """What a resume needs: the step shape and the swap manager's swap-outs."""
        return {"strategy": self.plan.strategy, "swapped": list(self.dsm.swapped) if self.dsm else []}

    # -- records -------------------------------------------------------------

    def drain(self) -> tuple[list[dict], list[dict]]:
        """The moves and the per-turn trace since the last drain (seconds resolved), then forgotten."""
        return self.meter.drain()
