"""The moves' parts: a unit's tensors and where they are (``Slot``), one recorded move (``Move``), the
copies themselves (``Mover``: side streams and events on CUDA, plain copies on a CPU), page-locked home
buffers, and the ``Meter`` that keeps the moves, each turn's peak use and the allocator's peaks.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

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
    drain_in: str | None = None  # the turn during which its copy home runs beside the compute
    on_device: bool = False
    moments_on_device: bool = False
    home: torch.Tensor | None = None  # (numel,) weights while out
    home_moments: dict[str, torch.Tensor] = field(default_factory=dict)  # exp_avg / exp_avg_sq, (numel,)
    device_flat: torch.Tensor | None = None  # (numel,) weights while in (streamed units)
    device_moments: dict[str, torch.Tensor] = field(default_factory=dict)
    ready: object | None = None  # CUDA event the compute stream waits on before using the unit
    sent: object | None = None  # CUDA event of its last copy home: a copy in of its home buffers waits on it

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

    def copy(
        self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], direction: str, after: object | None = None
    ):
        """dst.copy_(src) for each pair, after the event ``after`` (a copy that writes what these read);
        returns (ready event or None, timing events or seconds)."""
        if not self.cuda:
            t0 = time.perf_counter()
            for dst, src in pairs:
                dst.copy_(src)
            return None, time.perf_counter() - t0
        stream = self.streams[direction]
        # The side stream must not start before the compute stream has finished with the memory it
        # reads (the unit's last step) or writes (a block the allocator just handed out).
        stream.wait_stream(torch.cuda.current_stream())
        if after is not None:
            stream.wait_event(after)
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


class PinError(RuntimeError):
    """Page-locking a buffer failed and left no CUDA error behind: pageable memory can take its place."""


def _clear_cuda_error() -> bool:
    """Read back (and so clear) this thread's last CUDA runtime error; False where that cannot be done.

    A failed ``cudaHostRegister`` stays the thread's last error, and the next kernel launch's check
    would report it as its own. torch binds no ``cudaGetLastError``, so it is called in the runtime
    library torch loaded (found in ``/proc/self/maps``)."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            path = next(line.split()[-1] for line in maps if "libcudart.so" in line)
        ctypes.CDLL(path).cudaGetLastError()
    except (OSError, StopIteration, AttributeError):
        return False
    return True


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
        if not _clear_cuda_error():  # the error stays pending: no fallback can run after it
            raise RuntimeError(
                f"cudaHostRegister failed with CUDA error {err} and the error could not be cleared; "
                "set memory.pin_memory=false to stream through pageable memory"
            )
        raise PinError(f"cudaHostRegister failed with CUDA error {err}")
    # Unregistered when this flat tensor goes (views of it that outlive it just become pageable).
    weakref.finalize(t, torch.cuda.cudart().cudaHostUnregister, ptr)
    return t


class Meter:
    """Device memory use and the record of moves: the running peak (the allocator's on CUDA, the
    accounted bytes on a CPU), each optimizer step's peak over its turns, and every move and turn.

    ``accounted``: the bytes of weights, gradients and moments the placement has on the device now
    (plus ``live``, shard buffers of moments in flight), a CPU-only trial's measure of use."""

    def __init__(self, device: torch.device, accounted: Callable[[], int], context_bytes: Callable[[], int]):
        self.device, self._accounted, self._context = device, accounted, context_bytes
        self.cuda = device.type == "cuda"
        self.moves: list[Move] = []
        self.trace: list[dict] = []  # per unit turn: its peak use
        self.epoch, self.step = 0, 0
        self.live = 0  # shard buffers of moments on the device
        self._peak = 0  # accounted bytes (CPU), since the last reset
        self.step_peak = 0  # the current optimizer step's peak use, over its turns
        self._peaks = {"allocated": 0, "reserved": 0}  # CUDA allocator peaks since take_peaks()

    def accounted(self) -> int:
        return self._accounted() + self.live

    def now(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else self.accounted()

    def note(self) -> None:
        """Update the running peak of the accounted bytes (a CPU-only trial's measure of use; a GPU's
        allocator keeps its own peak, so there this costs nothing)."""
        if not self.cuda:
            self._peak = max(self._peak, self.accounted())

    def use_bytes(self) -> int:
        """Measured use since the last reset: the allocator's peak plus the context (CUDA), or the
        accounted peak."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) + self._context()
        return self._peak

    def reset_peak(self) -> None:
        if self.cuda:
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
        if not self.cuda:
            return {"allocated": 0, "reserved": 0}
        self._fold_peaks()
        out, self._peaks = dict(self._peaks), {"allocated": 0, "reserved": 0}
        return out

    def record(self, unit: str, action: str, nbytes: int, before: int, timing) -> None:
        move = Move(self.epoch, self.step, unit, action, nbytes, before, self.now())
        if isinstance(timing, float):
            move.seconds = timing
        else:
            move._events = timing
        self.moves.append(move)

    def drain(self) -> tuple[list[dict], list[dict]]:
        """The moves and the per-turn trace since the last drain (seconds resolved), then forgotten."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            for m in self.moves:
                if m._events is not None:
                    m.seconds = m._events[0].elapsed_time(m._events[1]) / 1000
                    m._events = None
        moves, trace = [m.record() for m in self.moves], self.trace
        self.moves, self.trace = [], []
        return moves, trace
