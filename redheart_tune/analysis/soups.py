"""Weight soups: checkpoints' weights averaged.

- the *uniform soup* (``soup_model``): whole checkpoints averaged, read one at a time;
- the *group soup* (``build_group_soup``): each selection unit gets a list of epochs instead of one
  and its weights are averaged over them.  The unit is the grain: a linked group's
  modules are averaged over the same epochs, as one unit, and no unit's weights are
  ever averaged with another unit's epochs.  A soup of one epoch per unit is the
  crossover itself, tensor for tensor (``analysis.crossover`` builds it so).

Which checkpoints the greedy soups keep is chosen on validation data (``analysis.selection``).

    members = window_members(spots, 1, sorted(run.complete))    # each unit's spot and its neighbours
    soup, sources = build_group_soup(members, run.complete, run.meta)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from redheart_tune.analysis.experiment import TrainingRun
from redheart_tune.analysis.weights import (
    CrossoverError,
    check_unit_tensors,
    checkpoint_for,
    fresh_model,
    load_unit,
    model_for_state,
)
from redheart_tune.engine.checkpoints import group_file, load_model_state
from redheart_tune.model.family import RedHeart
from redheart_tune.model.groups import SelectionUnit, selection_units

# ---------------------------------------------------------------------------
# The running average


class SoupSum:
    """A running sum of state dicts, so a soup of big checkpoints holds two states in memory, not k."""

    def __init__(self) -> None:
        self.total: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.count and set(state) != set(self.total):
            raise CrossoverError(f"soup member {self.count} has different keys than member 0")
        for k, v in state.items():
            if not v.is_floating_point():  # counters and indices cannot be averaged; they must agree
                if self.count and not torch.equal(self.total[k], v):
                    raise CrossoverError(f"soup members disagree on the non-float tensor {k!r}")
                self.total[k] = v.clone()
            else:
                # float64 sums: the average of 30 fp32 checkpoints is exact to fp32 precision
                self.total[k] = self.total[k] + v.double() if self.count else v.double()
        self.count += 1

    def plus(self, state: Mapping[str, torch.Tensor]) -> SoupSum:
        """A new sum with ``state`` added (this one unchanged)."""
        out = SoupSum()
        out.total, out.count = dict(self.total), self.count
        out.add(state)
        return out

    def average(self, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The uniform average, in the dtypes of ``like`` (any member)."""
        if not self.count:
            raise CrossoverError("a soup needs at least one member")
        return {
            k: (v / self.count).to(like[k].dtype) if v.is_floating_point() else v.clone()
            for k, v in self.total.items()
        }


# ---------------------------------------------------------------------------
# Group soups: per unit, its own epochs


def assemble_soup_state(
    members: Mapping[str, Sequence[int]],
    checkpoints: Mapping[int, Path],
    reference: Mapping[str, torch.Tensor],
    *,
    problems: Mapping[int, str] | None = None,
    units: tuple[SelectionUnit, ...] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The group soup's state dict: every unit's weights averaged over its own ``members`` epochs, and per
    unit where they came from ({epochs, checkpoints, file, keys}).

    ``members`` is keyed by selection unit (``model.groups.selection_units``): a linked group is one key,
    so its modules can only be averaged together over one list of epochs; a key that is not a unit (a
    module of a linked group, a typo) is refused.  One epoch for a unit copies its tensors unchanged.
    """
    units = units or selection_units()
    unknown = sorted(set(members) - {u.name for u in units})
    if unknown:
        raise CrossoverError(
            f"group soup members for {unknown}, which are not selection units; a linked group is averaged "
            f"as one unit (known units: {', '.join(u.name for u in units)})"
        )
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, dict] = {}
    for unit in units:
        if not members.get(unit.name):
            raise CrossoverError(f"no epochs for unit {unit.name!r}; got members for {sorted(members)}")
        epochs = [int(e) for e in members[unit.name]]
        if len(set(epochs)) != len(epochs):
            raise CrossoverError(f"unit {unit.name!r}: epochs {epochs} repeat a checkpoint")
        soup = SoupSum()
        directories = []
        for epoch in epochs:
            directory = checkpoint_for(unit.name, epoch, checkpoints, problems)
            tensors = load_unit(directory, unit)
            check_unit_tensors(tensors, reference, unit, directory)
            directories.append(str(directory))
            if len(epochs) == 1:
                break
            soup.add(tensors)
        state.update(tensors if len(epochs) == 1 else soup.average(tensors))
        sources[unit.name] = {
            "epochs": epochs,
            "checkpoints": directories,
            "file": group_file(unit.group),
            "keys": len(tensors),
        }
    missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or extra:  # the group declaration and the checkpoints' files disagree
        raise CrossoverError(
            f"the selection units do not cover the model: missing {missing[:5]}, extra {extra[:5]}; "
            "check redheart_tune/model/groups.py against the checkpoints' group files"
        )
    return state, sources


def build_group_soup(
    members: Mapping[str, Sequence[int]],
    checkpoints: Mapping[int, Path],
    metas: Mapping[int, Mapping],
    *,
    problems: Mapping[int, str] | None = None,
) -> tuple[RedHeart, dict[str, dict]]:
    """A fresh model holding every unit's weights averaged over its own ``members`` epochs (strict load)."""
    return fresh_model(assemble_soup_state, members, checkpoints, metas, problems)


def window_members(spots: Mapping[str, int], k: int, available: Sequence[int]) -> dict[str, list[int]]:
    """``{unit: epochs}``: each unit's sweet spot and the ``k`` complete checkpoints on each side of it
    (counted in checkpoints, not epochs, and clamped to the first and last that exist: a spot at the
    first checkpoint gets only the ``k`` after it).  ``k = 0`` gives the sweet spots themselves."""
    if k < 0:
        raise CrossoverError(f"the soup window must be >= 0 checkpoints on each side, got {k}")
    avail = sorted(int(e) for e in available)
    out = {}
    for unit, epoch in spots.items():
        if int(epoch) not in avail:
            raise CrossoverError(
                f"the sweet spot of {unit!r} is epoch {epoch}, not a complete checkpoint ({avail})"
            )
        i = avail.index(int(epoch))
        out[unit] = avail[max(0, i - k) : i + k + 1]
    return out


# ---------------------------------------------------------------------------
# The uniform soup: whole checkpoints


def soup_model(run: TrainingRun, epochs: Sequence[int]) -> nn.Module:
    """The uniform weight average of the checkpoints of ``epochs``, read one at a time."""
    soup = SoupSum()
    for e in epochs:
        state = load_model_state(run.complete[e])
        soup.add(state)
    return model_for_state(run, soup.average(state), f"soup of epochs {list(epochs)} of {run.trial_path}")
