"""The dynamic swap manager (DSM), run on top of the plan after every unit's turn.

The plan is an estimate; fragmentation, the allocator's cache and activations it
guessed wrong can push real use past it.  After each unit's optimizer step the
swap manager reads the use (the turn's peak over the budget) and applies the
spec's rule to the units the plan kept resident:

- use > target after a unit's turn: swap out ``max(1, int((use - target) * 10))``
  of them by ascending priority (one per 10 % over); they stream from then on;
- use < target - 0.1 over a whole optimizer step (every unit's turn: one small
  unit's quiet turn says nothing about the big ones): bring back the most
  recently swapped-out unit, if that step's peak plus the unit's bytes stays
  within the target (without that check a unit swapped out for cause would come
  straight back and bounce every step).

Units of the never-swapped priority (the backbone's group) are never candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from redheart_tune.model.groups import NEVER_SWAPPED


@dataclass(frozen=True)
class Candidate:
    name: str
    priority: int
    bytes: int
    """What making it resident again adds to the device: its weights and AdamW moments."""


def swap_out_count(use: float, target: float) -> int:
    """How many units to swap out at this use: one per 10 % over the target, at least one."""
    return max(1, int((use - target) * 10))


@dataclass
class SwapManager:
    """The rule and its state: the stack of units it swapped out, most recent last."""

    target: float
    budget_bytes: int
    swapped: list[str] = field(default_factory=list)

    def to_swap_out(self, use: float, resident: list[Candidate]) -> list[str]:
        """After a unit's turn whose peak was ``use`` (a share of the budget): the resident units to swap out."""
        if use <= self.target:
            return []
        movable = [c for c in resident if c.priority < NEVER_SWAPPED]
        movable.sort(key=lambda c: (c.priority, -c.bytes))  # lowest priority first, the bigger among equals
        return [c.name for c in movable[: swap_out_count(use, self.target)]]

    def to_bring_back(self, step_use: float, swapped: dict[str, Candidate]) -> str | None:
        """After an optimizer step whose peak was ``step_use``: the unit to make resident again, if any."""
        if not self.swapped or step_use >= self.target - 0.1:
            return None
        back = swapped[self.swapped[-1]]
        return back.name if step_use + back.bytes / self.budget_bytes <= self.target else None

    def state_dict(self) -> dict:
        return {"swapped": list(self.swapped)}

    def load_state_dict(self, state: dict) -> None:
        self.swapped = list(state["swapped"])
