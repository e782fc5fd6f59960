"""What each unit weighs: its parameters' bytes, the activations one micro-batch saves, AdamW's moment shards.

The plan (``plan.py``) decides from these figures; nothing here decides anything.
Activations are estimated on the meta device from the tensors autograd saves for
backward, so no weights are allocated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from redheart_tune.model.groups import selection_units, unit_priority

GiB = 2**30
WEIGHT_BYTES = 4  # fp32 master weights; gradients have the same size
MOMENT_BYTES = 8  # AdamW's exp_avg and exp_avg_sq, fp32


def size(nbytes: float) -> str:
    """Bytes as GiB, or MiB below one GiB (the tests' budgets are a few MiB)."""
    return f"{nbytes / GiB:.2f} GiB" if abs(nbytes) >= GiB else f"{nbytes / 2**20:.1f} MiB"


@dataclass(frozen=True)
class UnitSize:
    """One unit's parameters and the activations one micro-batch saves for its backward."""

    name: str
    priority: int
    param_numels: tuple[int, ...]  # in the order of the unit's parameters
    activation_bytes: int
    checkpointed_activation_bytes: int = 0
    """Activations with activation checkpointing inside the unit (0: the unit has none)."""
    pass_batches: int = 1
    """Micro-batches its forward and backward take at once (the plan chooses; activations scale with it)."""
    checkpoint: bool = False
    """Whether its turn uses activation checkpointing (the plan chooses it where it buys a larger pass)."""

    @property
    def pass_activation_bytes(self) -> int:
        per_batch = self.checkpointed_activation_bytes if self.checkpoint else self.activation_bytes
        return per_batch * self.pass_batches

    @property
    def numel(self) -> int:
        return sum(self.param_numels)

    @property
    def weights(self) -> int:
        return WEIGHT_BYTES * self.numel

    @property
    def moments(self) -> int:
        return MOMENT_BYTES * self.numel


def shard_partition(numels: Sequence[int], shard_bytes: int) -> list[list[int]]:
    """Consecutive parameter indices whose AdamW moments take at most ``shard_bytes`` each.

    A parameter larger than the cap gets a shard of its own: a tensor is never split.
    """
    cap = max(1, shard_bytes // MOMENT_BYTES)
    shards: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, n in enumerate(numels):
        if current and size + n > cap:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        shards.append(current)
    return shards


def moment_window_bytes(numels: Sequence[int], shard_bytes: int) -> int:
    """Moment bytes on the device at once when a unit's moments pass through its step in shards:
    one shard stepping and the next one arriving (the largest such pair; one shard alone if only one)."""
    shards = [MOMENT_BYTES * sum(numels[i] for i in s) for s in shard_partition(numels, shard_bytes)]
    return max([a + b for a, b in zip(shards, shards[1:], strict=False)] or shards)


# ---------------------------------------------------------------------------
# Sizes, on the meta device


CHECKPOINTED_UNIT = "group_b"
"""The unit whose turn can use activation checkpointing (``RedHeart.forward_unit(checkpoint=True)``)."""


def measure_units(
    model: torch.nn.Module, batch_size: int, tokens: int, input_dim: int, activation_bytes: int
) -> tuple[UnitSize, ...]:
    """Every unit's parameter sizes and an activation estimate for one micro-batch of batch_size x tokens.

    ``model`` is a RedHeart built on the meta device.  The forward runs on meta
    tensors with a saved-tensor hook that adds up what autograd keeps for
    backward (each tensor once; parameters and views of them left out), at
    ``min(tokens, 32)`` tokens and scaled linearly to ``tokens`` (a meta LSTM
    unrolls per token, so the full length costs seconds); element sizes are
    taken as ``activation_bytes`` (2 under autocast, 4 in fp32).
    """
    params = {id(p) for p in model.parameters()}
    t_est = min(tokens, 32)
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            saved[id(t)] = t
        return t

    x = torch.empty(batch_size, t_est, input_dim, device="meta")  # (B, T, E)
    mask = torch.ones(batch_size, t_est, dtype=torch.bool, device="meta")
    pooled = torch.empty(batch_size, input_dim, device="meta")

    def saved_elements(fn, *args, **kwargs) -> int:
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*args, **kwargs)
        return sum(t.numel() for t in saved.values())

    def to_bytes(elements: int) -> int:
        return math.ceil(elements * activation_bytes * tokens / t_est)

    sizes = []
    for unit in selection_units():
        elements = saved_elements(model.forward_unit, unit.name, x, mask, pooled)
        checkpointed = 0
        if unit.name == CHECKPOINTED_UNIT:
            # What stays outside the checkpointed summaries, plus the largest summary recomputed in backward.
            outside = saved_elements(model.forward_unit, unit.name, x, mask, pooled, checkpoint=True)
            inside = max(saved_elements(model.get_submodule(m).summarize, x, mask) for m in unit.modules)
            checkpointed = to_bytes(outside + inside)
        unit_params = [p for m in unit.modules for p in model.get_submodule(m).parameters()]
        sizes.append(
            UnitSize(
                name=unit.name,
                priority=unit_priority(unit),
                param_numels=tuple(p.numel() for p in unit_params),
                activation_bytes=to_bytes(elements),
                checkpointed_activation_bytes=checkpointed,
            )
        )
    return tuple(sizes)
