"""Phase 4: one model assembled from each unit's sweet-spot checkpoint, and its ±Δ variants.

The crossover is the group soup (``analysis.soups``) of one epoch per unit: every unit's weights are
copied unchanged from its own sweet-spot checkpoint, key by key and checked (``analysis.weights``).

    model, sources = build_crossover(spots, run.complete, run.meta)
    variants = variant_spots(spots, (-4, -2, 0, 2, 4), sorted(run.complete))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from redheart_tune.analysis.soups import assemble_soup_state
from redheart_tune.analysis.weights import CrossoverError, fresh_model
from redheart_tune.model.family import RedHeart
from redheart_tune.model.groups import SelectionUnit, selection_units

DEFAULT_DELTAS: tuple[int, ...] = (-4, -2, 0, 2, 4)


def assemble_state(
    spots: Mapping[str, int],
    checkpoints: Mapping[int, Path],
    reference: Mapping[str, torch.Tensor],
    *,
    problems: Mapping[int, str] | None = None,
    units: tuple[SelectionUnit, ...] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The crossover state dict and, per unit, where it came from ({epoch, checkpoint, file, keys})."""
    for unit in units or selection_units():
        if unit.name not in spots:
            raise CrossoverError(f"no sweet spot for unit {unit.name!r}; got spots for {sorted(spots)}")
    members = {u: [int(e)] for u, e in spots.items()}
    state, soup_sources = assemble_soup_state(members, checkpoints, reference, problems=problems, units=units)
    sources = {
        u: {"epoch": s["epochs"][0], "checkpoint": s["checkpoints"][0], "file": s["file"], "keys": s["keys"]}
        for u, s in soup_sources.items()
    }
    return state, sources


def build_crossover(
    spots: Mapping[str, int],
    checkpoints: Mapping[int, Path],
    metas: Mapping[int, Mapping],
    *,
    problems: Mapping[int, str] | None = None,
) -> tuple[RedHeart, dict[str, dict]]:
    """A fresh model holding every unit's weights from its own sweet-spot checkpoint (strict load)."""
    return fresh_model(assemble_state, spots, checkpoints, metas, problems)


# ---------------------------------------------------------------------------
# Ensemble variants


def shift_spot(epoch: int, delta: int, available: Sequence[int]) -> int:
    """``epoch + delta`` clamped to the first/last available epochs and snapped to the nearest
    available one (a tie goes to the earlier epoch)."""
    if not available:
        raise CrossoverError("no complete checkpoint to shift a sweet spot onto")
    avail = sorted(int(e) for e in available)
    target = min(max(epoch + delta, avail[0]), avail[-1])
    return min(avail, key=lambda e: (abs(e - target), e))


def variant_spots(
    spots: Mapping[str, int], deltas: Sequence[int], available: Sequence[int]
) -> dict[int, dict[str, int]]:
    """``{delta: {unit: epoch}}``; every variant shifts the sweet spots themselves, never another
    variant's (shifts would otherwise compound from one variant to the next)."""
    if len(set(deltas)) != len(deltas):
        raise CrossoverError(f"deltas {list(deltas)} repeat a value")
    return {int(d): {u: shift_spot(int(e), int(d), available) for u, e in spots.items()} for d in deltas}
