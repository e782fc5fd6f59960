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
before it touches them.  A copy out is waited for by the compute stream before
its device memory can be reused.  On a CPU the same moves are plain copies, so
the tests exercise every move for real.

Every move is recorded (epoch, step, unit, action, bytes, seconds, memory before
and after) for the run's metrics and the DSM figure; ``accounted()`` is the bytes
of weights, gradients and moments the placement has put on the device (a
CPU-only trial's measure of use; a GPU's allocator measures itself).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from redheart_tune.engine.memory.budget import Budget, refresh_context
from redheart_tune.engine.memory.dsm import Candidate, SwapManager
from redheart_tune.engine.memory.plan import (
    MOMENT_BYTES,
    WEIGHT_BYTES,
    MemoryPlan,
    UnitSize,
    replan,
    shard_partition,
)
from redheart_tune.model.groups import selection_units

log = logging.getLogger(__name__)

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class Slot:
    """One unit's tensors and where they are."""

    name: str
    priority: int
    params: list[nn.Parameter]
    resident: bool
    moments_mode: str  # "resident" | "with_unit" | "sharded": how the plan wants its moments moved
    prefetch_at: str | None = None
    on_device: bool = False
    moments_on_device: bool = False
    home: torch.Tensor | None = None  # (numel,) weights while out
    home_moments: dict[str, torch.Tensor] = field(default_factory=dict)  # exp_avg / exp_avg_sq, (numel,)
    device_flat: torch.Tensor | None = None  # (numel,) weights while in (streamed units)
    device_moments: dict[str, torch.Tensor] = field(default_factory=dict)
    ready: object | None = None  # CUDA event the compute stream waits on before using the unit

    def __post_init__(self) -> None:
        self.sizes = [p.numel() for p in self.params]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.numel = sum(self.sizes)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` cut into tensors of this unit's parameter shapes, in parameter order."""
        return [
            flat[o : o + n].view(p.shape)
            for o, n, p in zip(self.offsets, self.sizes, self.params, strict=True)
        ]


@dataclass
class Move:
    epoch: int
    step: int
    unit: str
    action: str  # stream_in | stream_out | swap_out | swap_in | moments_in | moments_out | eval_in
    bytes: int
    memory_before: int
    memory_after: int
    seconds: float | None = None
    _events: tuple | None = None  # CUDA (start, end) events, resolved into seconds later

    def record(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "module": self.unit,
            "action": self.action,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "memory_before": self.memory_before,
            "memory_after": self.memory_after,
        }


class Mover:
    """Copies between home buffers and the device: on a side stream per direction with events (CUDA),
    or plain copies (CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.streams = (
            {"in": torch.cuda.Stream(device), "out": torch.cuda.Stream(device)} if self.cuda else {}
        )

    def copy(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], direction: str):
        """dst.copy_(src) for each pair; returns (ready event or None, timing events or seconds)."""
        if not self.cuda:
            t0 = time.perf_counter()
            for dst, src in pairs:
                dst.copy_(src)
            return None, time.perf_counter() - t0
        stream = self.streams[direction]
        # The side stream must not start before the compute stream has finished with the memory it
        # reads (the unit's last step) or writes (a block the allocator just handed out).
        stream.wait_stream(torch.cuda.current_stream())
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record()
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            end.record()
        return end, (start, end)

    @staticmethod
    def wait(event: object | None) -> None:
        if event is not None:
            torch.cuda.current_stream().wait_event(event)


def page_locked(numel: int) -> torch.Tensor:
    """A CPU fp32 buffer of exactly ``numel`` elements, page-locked for asynchronous copies.

    ``torch.empty(..., pin_memory=True)`` rounds every allocation up to a power of
    two (a 1.47 GB buffer takes 2 GiB), so the buffer is allocated pageable and
    registered with CUDA instead, and unregistered when it is freed.
    """
    t = torch.empty(numel, dtype=torch.float32)
    ptr = t.data_ptr()
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, t.numel() * t.element_size(), 0))
    if err != 0:
        raise RuntimeError(f"cudaHostRegister failed with CUDA error {err}")
    # Unregistered when this flat tensor goes (views of it that outlive it just become pageable).
    weakref.finalize(t, torch.cuda.cudart().cudaHostUnregister, ptr)
    return t


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
            )
        self.moves: list[Move] = []
        self.trace: list[dict] = []  # per unit turn: its peak use
        self.epoch, self.step = 0, 0
        self._peak = 0  # accounted bytes (CPU), since the last reset
        self._step_peak = 0  # the current optimizer step's peak use, over its turns
        self._peaks = {"allocated": 0, "reserved": 0}  # CUDA allocator peaks since take_peaks()
        self._live_extra = 0  # shard buffers of moments on the device
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
        self._reset_peak()

    def _home_buffer(self, numel: int) -> torch.Tensor:
        if self.pin:
            try:
                return page_locked(numel)
            except RuntimeError as exc:  # page-locking can fail when the OS limit is reached
                log.warning(
                    "cannot page-lock %.2f GiB of CPU memory (%s); using pageable memory",
                    4 * numel / 2**30,
                    exc,
                )
                self.pin = False
        return torch.empty(numel, dtype=torch.float32)

    # -- bookkeeping ---------------------------------------------------------

    def accounted(self) -> int:
        """Bytes of weights, gradients and AdamW moments this placement has on the device right now."""
        total = self._live_extra
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
        return total

    def note(self) -> None:
        """Update the running peak of the accounted bytes (a CPU-only trial's measure of use; a GPU's
        allocator keeps its own peak, so there this costs nothing)."""
        if self.device.type != "cuda":
            self._peak = max(self._peak, self.accounted())

    def use_bytes(self) -> int:
        """Measured use since the last reset: the allocator's peak plus the context (CUDA), or the
        accounted peak."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) + self.budget.context_bytes
        return self._peak

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            self._fold_peaks()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak = self.accounted()

    def _fold_peaks(self) -> None:
        self._peaks["allocated"] = max(self._peaks["allocated"], torch.cuda.max_memory_allocated(self.device))
        self._peaks["reserved"] = max(self._peaks["reserved"], torch.cuda.max_memory_reserved(self.device))

    def take_peaks(self) -> dict[str, int]:
        """The allocator's peak allocated and reserved bytes since the last call (CUDA; zeros on a CPU).

        The placement resets the allocator's peak counters at every unit turn (each
        turn's peak is what the swap manager judges), so these longer peaks are
        kept here.
        """
        if self.device.type != "cuda":
            return {"allocated": 0, "reserved": 0}
        self._fold_peaks()
        out, self._peaks = dict(self._peaks), {"allocated": 0, "reserved": 0}
        return out

    def _memory_now(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else self.accounted()

    def _has_moments(self, slot: Slot) -> bool:
        opt_state = self.optimizers[slot.name].state
        return bool(slot.params) and all(m in opt_state.get(p, {}) for p in slot.params for m in MOMENTS)

    def _record(self, unit: str, action: str, nbytes: int, before: int, timing) -> None:
        move = Move(self.epoch, self.step, unit, action, nbytes, before, self._memory_now())
        if isinstance(timing, float):
            move.seconds = timing
        else:
            move._events = timing
        self.moves.append(move)

    # -- moves ---------------------------------------------------------------

    def _bring_in(self, slot: Slot, *, moments: bool, action: str) -> None:
        """Allocate the unit's device buffers and start copying its weights (and moments) in."""
        before = self._memory_now()
        slot.device_flat = torch.empty(slot.numel, dtype=torch.float32, device=self.device)
        pairs = [(slot.device_flat, slot.home)]
        nbytes = WEIGHT_BYTES * slot.numel
        move_moments = moments and self._has_moments(slot)
        if move_moments:
            pairs += self._moment_pairs_in(slot)
            nbytes += MOMENT_BYTES * slot.numel
        slot.ready, timing = self.mover.copy(pairs, "in")
        for view, p in zip(slot.views(slot.device_flat), slot.params, strict=True):
            p.data = view
        slot.on_device = True
        self._record(slot.name, action, nbytes, before, timing)
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

    def _send_out(self, slot: Slot, *, action: str, copy_weights: bool = True) -> None:
        """Copy the unit's weights (and its moments, when they are on the device) home; free its device memory."""
        before = self._memory_now()
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
        # The compute stream waits for the copy before anything can reuse the unit's device memory.
        self.mover.wait(event)
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
            self._record(slot.name, action, nbytes, before, timing)

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
        """After ``optimizer.load_state_dict`` (resume): moments of units that are out go into their home buffers."""
        for slot in self.slots.values():
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
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- steps and turns -----------------------------------------------------

    def start_step(self, epoch: int, step: int) -> None:
        """A new optimizer step (1-based within the epoch) begins: moves are recorded under it."""
        self.epoch, self.step = epoch, step
        self._step_peak = 0
        self._reset_peak()

    def turn_order(self) -> list[str]:
        """Units in the order of this step's turns: resident ones first, then streamed, by priority."""
        order = [u.name for u in self.plan.units]
        return [n for n in order if self.slots[n].resident] + [n for n in order if not self.slots[n].resident]

    def begin_turn(self, unit: str, upcoming: Sequence[str] = ()) -> None:
        """Make ``unit`` usable on the device (moments too, where its plan keeps them with it), and start
        the prefetches the plan times for this turn."""
        slot = self.slots[unit]
        wants_moments = slot.moments_mode == "with_unit"
        if not slot.on_device:
            self._bring_in(slot, moments=wants_moments, action="stream_in")
        elif not slot.resident and wants_moments and not slot.moments_on_device and self._has_moments(slot):
            # prefetched while the plan still sharded its moments; the swap manager has since made room
            before = self._memory_now()
            event, timing = self.mover.copy(self._moment_pairs_in(slot), "in")
            self.mover.wait(slot.ready)
            slot.ready = event
            self._record(unit, "moments_in", MOMENT_BYTES * slot.numel, before, timing)
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
            self._sharded_step(slot, optimizer)
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
        self._step_peak = max(self._step_peak, use)
        if not slot.resident:
            self._send_out(slot, action="stream_out")
        self.trace.append({"epoch": self.epoch, "step": self.step, "unit": unit, "peak_bytes": use})
        if self.dsm is not None and self.streaming:
            self._swap_out_above_target(use)
        self._reset_peak()

    def end_step(self) -> None:
        """Every unit has had its turn: the swap manager judges the whole step.

        A resident-shape step (micro-batches outer) holds every unit's gradients
        until the last unit has stepped, so nothing can move before now: its
        swap-outs are decided here, on the step's peak.  A unit is brought back
        only after a whole step of the placement it was swapped out of.  After the
        trial's first step the CUDA context is measured again (cuBLAS and cuDNN
        add to it lazily) and the cap follows.
        """
        if not self._context_checked:
            self._context_checked = True
            self.budget = refresh_context(self.budget, self.device)
        if self.dsm is None or not self.managed:
            return
        if not self.streaming:
            self._swap_out_above_target(self._step_peak)
            return
        if not self.dsm.swapped:
            return
        swapped = {n: Candidate(n, self.slots[n].priority, self._unit_bytes(n)) for n in self.dsm.swapped}
        back = self.dsm.to_bring_back(self._step_peak / self.dsm.budget_bytes, swapped)
        if back is None:
            return
        slot = self.slots[back]
        self._bring_in(slot, moments=True, action="swap_in")
        self.mover.wait(slot.ready)
        slot.ready = None
        slot.resident = True
        self.dsm.swapped.remove(back)
        self._apply(replan(self.plan, self.sizes, self._resident_names()))

    def _sharded_step(self, slot: Slot, optimizer: torch.optim.Optimizer) -> None:
        """AdamW's step with the unit's moments passing through the device shard by shard.

        Gradients of parameters outside the current shard are hidden (AdamW skips a
        parameter whose ``grad`` is None), so each call updates exactly one shard,
        with the same arithmetic as one step over the whole unit.  A shard is a
        contiguous range of the unit's flat buffers: one copy per moment each way.
        The next shard's moments are copied in while the current one steps.
        """
        unit = slot.name
        shards = shard_partition(slot.sizes, self.plan.shard_bytes)
        grads = [p.grad for p in slot.params]
        first = not self._has_moments(slot)
        opt_state = optimizer.state
        home = self._home_moments(slot)
        home_views = {m: slot.views(home[m]) for m in MOMENTS}

        def span(idx: list[int]) -> tuple[int, int]:
            return slot.offsets[idx[0]], slot.offsets[idx[-1]] + slot.sizes[idx[-1]]

        def fetch(k: int) -> tuple[dict[str, torch.Tensor], object | None]:
            if first:
                return {}, None
            lo, hi = span(shards[k])
            bufs = {m: torch.empty(hi - lo, dtype=torch.float32, device=self.device) for m in MOMENTS}
            before = self._memory_now()
            event, timing = self.mover.copy([(bufs[m], home[m][lo:hi]) for m in MOMENTS], "in")
            self._live_extra += MOMENT_BYTES * (hi - lo)
            self._record(unit, "moments_in", MOMENT_BYTES * (hi - lo), before, timing)
            return bufs, event

        pending = fetch(0)
        for k, idx in enumerate(shards):
            bufs, event = pending
            if k + 1 < len(shards):
                pending = fetch(k + 1)  # overlaps with this shard's step
            self.mover.wait(event)
            lo, hi = span(idx)
            nbytes = MOMENT_BYTES * (hi - lo)
            if first:
                self._live_extra += nbytes  # AdamW creates them on the device in this step
            else:
                for m in MOMENTS:
                    for i in idx:
                        a = slot.offsets[i] - lo
                        opt_state[slot.params[i]][m] = bufs[m][a : a + slot.sizes[i]].view(
                            slot.params[i].shape
                        )
            in_shard = set(idx)
            for i, p in enumerate(slot.params):
                p.grad = grads[i] if i in in_shard else None
            optimizer.step()
            self.note()
            # back home: one copy per moment (from the shard buffers), or per parameter (fresh ones)
            before = self._memory_now()
            if first:
                pairs = [(home_views[m][i], opt_state[slot.params[i]][m]) for m in MOMENTS for i in idx]
            else:
                pairs = [(home[m][lo:hi], bufs[m]) for m in MOMENTS]
            out_event, timing = self.mover.copy(pairs, "out")
            self.mover.wait(out_event)
            for m in MOMENTS:
                for i in idx:
                    opt_state[slot.params[i]][m] = home_views[m][i]
            self._live_extra -= nbytes
            self._record(unit, "moments_out", nbytes, before, timing)
        for p, g in zip(slot.params, grads, strict=True):
            p.grad = g
        slot.moments_on_device = False

    # -- evaluation turns (weights only, nothing to copy back) ---------------

    def begin_eval(self, unit: str) -> None:
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
            slot.moments_mode, slot.prefetch_at = u.moments, u.prefetch_at

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
        if self.device.type == "cuda":
            self.synchronize()
            for m in self.moves:
                if m._events is not None:
                    m.seconds = m._events[0].elapsed_time(m._events[1]) / 1000
                    m._events = None
        moves, trace = [m.record() for m in self.moves], self.trace
        self.moves, self.trace = [], []
        return moves, trace
