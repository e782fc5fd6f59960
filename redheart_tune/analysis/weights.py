"""Checkpoints' weights, read and checked: whether checkpoints can be combined, the fresh model their
meta.json describes, one selection unit's tensors, and a state written back atomically.

Weights are copied key by key: a linked group's whole file from its epoch's
checkpoint, an independent module's own keys only from that epoch's
independent.safetensors (read lazily, tensor by tensor).  Every unit's key set
and shapes are checked against a freshly built model before
``load_state_dict(strict=True)``; a missing or extra key is an error, never
skipped.  The crossover (``analysis.crossover``) and the soups (``analysis.soups``) are assembled
from these pieces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from redheart_tune.analysis.experiment import TrainingRun
from redheart_tune.config import config_from_dict
from redheart_tune.engine.checkpoints import META, CheckpointError, group_file, load_group
from redheart_tune.model.family import RedHeart, build_model
from redheart_tune.model.groups import SelectionUnit, param_prefix_owner
from redheart_tune.model.tasks import TaskSpec
from redheart_tune.util.files import write_atomic

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
    where = (lambda e: str(Path(paths[e]) / META)) if paths else (lambda e: f"epoch {e} {META}")
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
# A unit's checkpoint, the fresh model, a run's models


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


def fresh_model(assemble, choice, checkpoints, metas, problems) -> tuple[RedHeart, dict[str, dict]]:
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


def model_for_state(
    run: TrainingRun, state: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> nn.Module:
    """A fresh model of the run's architecture holding ``state`` (keys and shapes checked, strict load)."""
    model = model_from_meta(run.meta[min(run.complete)])
    check_state(state, model.state_dict(), source)
    model.load_state_dict(dict(state), strict=True)
    return model


def broken_epochs(run: TrainingRun) -> dict[int, str]:
    """Epoch -> why its checkpoint is not usable, for the errors of a sweet spot that points at one."""
    return {r.epoch: r.problem for r in run.checkpoints if not r.complete and r.epoch is not None}


# ---------------------------------------------------------------------------
# Writing


def save_state_atomic(
    state: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> Path:
    """safetensors written atomically (``tune.files.write_atomic``): a crash never leaves half a file."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return write_atomic(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
