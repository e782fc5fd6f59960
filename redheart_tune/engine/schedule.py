"""The learning-rate schedule every unit's AdamW follows: linear warm-up, then cosine cycles that restart."""

from __future__ import annotations

import math

import torch

__all__ = ["Schedule", "lr_factor"]


def lr_factor(step: int, *, warmup_steps: int, cycle_steps: int, min_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based).

    Warm-up rises linearly to 1; after it, cosine cycles of ``cycle_steps`` fall
    from 1 to ``min_ratio`` and restart at 1 (SGDR).  The cycle length is in
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
