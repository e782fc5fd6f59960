"""Phase 4: one model assembled from each unit's sweet-spot checkpoint, and its ±Δ variants;
and the group soups, assembled the same way from several checkpoints per unit.

Weights are copied key by key: a linked group's whole file from its epoch's
checkpoint, an independent module's own keys only from that epoch's
independent.safetensors (read lazily, tensor by tensor).  Every unit's key set
and shapes are checked against a freshly built model before
``load_state_dict(strict=True)``; a missing or extra key is an error, never
skipped.

A *group soup* gives each selection unit a list of epochs instead of one and
averages that unit's weights over them.  The unit is the grain: a linked group's
modules are averaged over the same epochs, as one unit, and no unit's weights are
ever averaged with another unit's epochs.  A soup of one epoch per unit is the
crossover itself, tensor for tensor.

    model, sources = build_crossover(spots, run.complete, run.meta)
    variants = variant_spots(spots, (-4, -2, 0, 2, 4), sorted(run.complete))
    members = window_members(spots, 1, sorted(run.complete))    # each unit's spot and its neighbours
    soup, sources = build_group_soup(members, run.complete, run.meta)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from redheart_tune.config import config_from_dict
from redheart_tune.engine.checkpoints import CheckpointError, group_file, load_group
from redheart_tune.model.family import RedHeart, build_model
from redheart_tune.model.groups import SelectionUnit, param_prefix_owner, selection_units
from redheart_tune.model.tasks import TaskSpec
from redheart_tune.util.files import write_atomic

DEFAULT_DELTAS: tuple[int, ...] = (-4, -2, 0, 2, 4)

# What must agree between checkpoints for their weights to be combined: the model's
# architecture and sizes, the tasks (output layers), and the encoder width.
COMPATIBILITY_FIELDS = ("config.model", "tasks", "input_dim")


class CrossoverError(ValueError):
    """Checkpoints cannot be combined (different models) or a sweet spot points nowhere; the message says which."""


# ---------------------------------------------------------------------------
# Checkpoint compatibility and the reference model


def _field(meta: Mapping, dotted: str):
    node = meta
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def check_compatible(metas: Mapping[int, Mapping], paths: Mapping[int, Path] | None = None) -> None:
    """Refuse checkpoints whose model config, tasks or input width differ from the earliest one's."""
    if not metas:
        raise CrossoverError("no checkpoint to combine")
    epochs = sorted(metas)
    ref_epoch = epochs[0]
    where = (lambda e: str(Path(paths[e]) / "meta.json")) if paths else (lambda e: f"epoch {e} meta.json")
    problems = []
    for name in COMPATIBILITY_FIELDS:
        ref = _field(metas[ref_epoch], name)
        if ref is _MISSING:
            problems.append(f"{where(ref_epoch)}: has no {name}")
            continue
        for e in epochs[1:]:
            value = _field(metas[e], name)
            if value != ref:
                shown = "missing" if value is _MISSING else repr(value)
                problems.append(f"{where(e)}: {name} = {shown}, but {where(ref_epoch)} has {ref!r}")
    if problems:
        raise CrossoverError(
            "checkpoints from different models cannot be crossed over:\n  - "
            + "\n  - ".join(problems)
            + "\nUse checkpoints of one training run only."
        )


def tasks_from_meta(meta: Mapping) -> dict[str, TaskSpec]:
    return {t: TaskSpec(t, s["kind"], tuple(s["labels"])) for t, s in meta["tasks"].items()}


def model_from_meta(meta: Mapping) -> RedHeart:
    """A freshly built model of the architecture a checkpoint's meta.json describes."""
    cfg = config_from_dict(meta["config"], "checkpoint meta.json config")
    return build_model(cfg.model, tasks_from_meta(meta), int(meta["input_dim"]))


# ---------------------------------------------------------------------------
# Reading one unit's tensors


def load_module_tensors(directory: Path, group: str, modules: Sequence[str]) -> dict[str, torch.Tensor]:
    """Only ``modules``' tensors from ``group``'s file; the rest of the file is never read."""
    path = Path(directory) / group_file(group)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing group file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            stored = list(f.keys())  # noqa: SIM118 (safe_open has no __iter__)
            undeclared = [k for k in stored if not _declared(k)]
            if undeclared:
                raise CrossoverError(
                    f"{path}: keys {undeclared[:5]} belong to no declared module; written by another model version"
                )
            return {k: f.get_tensor(k) for k in stored if param_prefix_owner(k) in modules}
    except CrossoverError:
        raise
    except Exception as exc:  # safetensors raises its own types for a corrupt header or payload
        raise CheckpointError(f"{path}: cannot be read as safetensors ({exc})") from exc


def _declared(key: str) -> bool:
    try:
        param_prefix_owner(key)
    except KeyError:
        return False
    return True


def load_unit(directory: Path, unit: SelectionUnit) -> dict[str, torch.Tensor]:
    """A linked group's whole file, or an independent module's own keys."""
    if unit.group == "independent":
        return load_module_tensors(directory, unit.group, unit.modules)
    return load_group(directory, unit.group)


def check_unit_tensors(
    tensors: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    unit: SelectionUnit,
    source: Path,
) -> None:
    """The unit's key set and every shape equal the fresh model's; the error names the file and keys."""
    expected = {k for k in reference if param_prefix_owner(k) in unit.modules}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise CrossoverError(
            f"{source / group_file(unit.group)}: unit {unit.name!r} has missing keys {missing[:5]} "
            f"({len(missing)} in all) and unexpected keys {extra[:5]} ({len(extra)}); the checkpoint "
            "was written by a different model version"
        )
    bad = [
        f"{k}: {tuple(tensors[k].shape)} vs model {tuple(reference[k].shape)}"
        for k in sorted(expected)
        if tensors[k].shape != reference[k].shape
    ]
    if bad:
        raise CrossoverError(f"{source / group_file(unit.group)}: shape mismatch for {'; '.join(bad[:5])}")


def check_state(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], source: str
) -> None:
    """A whole state dict's keys and shapes equal a freshly built model's; the error names ``source``.

    The meta check cannot see a preset whose sizes changed in the code since the
    checkpoint was written; this can, and says so instead of torch's long list.
    """
    missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    bad = [
        f"{k}: {tuple(state[k].shape)} vs model {tuple(reference[k].shape)}"
        for k in sorted(set(state) & set(reference))
        if state[k].shape != reference[k].shape
    ]
    if missing or extra or bad:
        raise CrossoverError(
            f"{source}: does not fit the model its meta.json describes as built by this code: "
            f"missing keys {missing[:3]} ({len(missing)}), unexpected keys {extra[:3]} ({len(extra)}), "
            f"shape mismatches {bad[:3]} ({len(bad)}). The model code (or its preset sizes) changed since "
            "the checkpoint was written; analyse it with the package version in its meta.json."
        )


# ---------------------------------------------------------------------------
# Assembly


def checkpoint_for(
    unit: str, epoch: int, checkpoints: Mapping[int, Path], problems: Mapping[int, str] | None = None
) -> Path:
    """The complete checkpoint of ``epoch``; a clear error when it is broken or absent."""
    if epoch in checkpoints:
        return Path(checkpoints[epoch])
    if problems and epoch in problems:
        raise CheckpointError(
            f"the sweet spot of {unit!r} is epoch {epoch}, whose checkpoint is broken: {problems[epoch]}. "
            "Re-run the sweet-spot analysis on the complete checkpoints (it skips broken ones)."
        )
    raise CheckpointError(
        f"the sweet spot of {unit!r} is epoch {epoch}, but there is no complete checkpoint of that epoch "
        f"(available: {sorted(checkpoints)})"
    )


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
    return _fresh_model(assemble_state, spots, checkpoints, metas, problems)


def build_group_soup(
    members: Mapping[str, Sequence[int]],
    checkpoints: Mapping[int, Path],
    metas: Mapping[int, Mapping],
    *,
    problems: Mapping[int, str] | None = None,
) -> tuple[RedHeart, dict[str, dict]]:
    """A fresh model holding every unit's weights averaged over its own ``members`` epochs (strict load)."""
    return _fresh_model(assemble_soup_state, members, checkpoints, metas, problems)


def _fresh_model(assemble, choice, checkpoints, metas, problems) -> tuple[RedHeart, dict[str, dict]]:
    """A model of the checkpoints' architecture loaded (strict) with ``assemble(choice, ...)``'s state."""
    # Every checkpoint offered must come from one model, not only the ones used: the variants and
    # soups draw on the rest, and a mixed folder is a mistake worth stopping at.
    check_compatible({e: metas[e] for e in checkpoints}, checkpoints)
    model = model_from_meta(metas[min(checkpoints)])
    state, sources = assemble(choice, checkpoints, model.state_dict(), problems=problems)
    model.load_state_dict(state, strict=True)
    return model, sources


def set_unit_tensors(model: nn.Module, unit: SelectionUnit, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy one unit's tensors into ``model`` in place, key by key (the unit's key set and shapes are
    checked first); the other units' weights are untouched."""
    current = model.state_dict()
    check_unit_tensors(tensors, current, unit, Path(f"<{unit.name} in memory>"))
    with torch.no_grad():
        for k, v in tensors.items():
            current[k].copy_(v)


# ---------------------------------------------------------------------------
# Weight averages


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
# Ensemble variants and soup windows


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
# Writing


def save_state_atomic(
    state: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> Path:
    """safetensors written atomically (``tune.files.write_atomic``): a crash never leaves half a file."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return write_atomic(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
