"""THE declaration of the Red Heart module groups.

Everything that needs to know which module belongs where (optimizer parameter
groups, per-module losses and metrics, the checkpoint layout, the sweet-spot
analysis, the crossover, the memory plan and swap manager) derives it from the
tables below.  The *selection units* (a linked group, or one independent module)
are also the units of training: each has its own optimizer, its own gradient
clipping and its own dropout stream, and the memory component moves each as one
piece between GPU and CPU.
Nothing else in the code base lists module names.

Why groups exist: modules of one *linked* group must always come from the same
epoch's checkpoint, because they read each other's outputs.  A module
may read only the sentence encoder's output and modules of its own group, and
only through a link declared in ``LINKS``.  That is what makes a model whose
groups come from different epochs a sound model.
"""

from __future__ import annotations

from dataclasses import dataclass

# The module keys are also the prefixes of the modules' parameters in the
# model's state dict: "heads.emotion" owns every key "heads.emotion.*".
GROUPS: dict[str, tuple[str, ...]] = {
    "group_a": ("backbone", "heads.emotion", "heads.bentham", "heads.regret", "heads.surd"),
    "group_b": ("neural_emotion", "neural_bentham", "neural_regret", "neural_surd"),
    "group_c": ("dsp", "kalman"),
    "independent": (
        "advanced_emotion",
        "advanced_regret",
        "advanced_bentham",
        "advanced_surd",
        "phase0",
        "phase1",
        "phase2",
    ),
}

# Linked groups are selected as one unit (one epoch for all members); the
# modules of "independent" are each selected on their own.
LINKED_GROUPS: tuple[str, ...] = ("group_a", "group_b", "group_c")

# The task each module predicts.  The backbone predicts nothing itself: its
# loss is the mean of the four heads' losses, the only signal it is trained on.
MODULE_TASK: dict[str, str | None] = {
    "backbone": None,
    "heads.emotion": "emotion",
    "heads.bentham": "bentham",
    "heads.regret": "regret",
    "heads.surd": "surd",
    "neural_emotion": "emotion",
    "neural_bentham": "bentham",
    "neural_regret": "regret",
    "neural_surd": "surd",
    "dsp": "emotion",
    "kalman": "emotion",
    "advanced_emotion": "emotion",
    "advanced_regret": "regret",
    "advanced_bentham": "bentham",
    "advanced_surd": "surd",
    "phase0": "emotion",
    "phase1": "regret",
    "phase2": "bentham",
}

# Declared reads between modules: reader -> the modules whose output it takes.
# Every link stays inside one group.  The four heads read the backbone's task
# features; the Kalman filter takes the DSP simulator's output as its required
# input; the neural analyzers exchange their summaries through one shared
# attention step (each reads the other three).
LINKS: dict[str, tuple[str, ...]] = {
    "heads.emotion": ("backbone",),
    "heads.bentham": ("backbone",),
    "heads.regret": ("backbone",),
    "heads.surd": ("backbone",),
    "neural_emotion": ("neural_bentham", "neural_regret", "neural_surd"),
    "neural_bentham": ("neural_emotion", "neural_regret", "neural_surd"),
    "neural_regret": ("neural_emotion", "neural_bentham", "neural_surd"),
    "neural_surd": ("neural_emotion", "neural_bentham", "neural_regret"),
    "kalman": ("dsp",),
}

# Dynamic swap manager priorities: higher is swapped later.
SWAP_PRIORITY: dict[str, int] = {
    "backbone": 100,
    "heads.emotion": 90,
    "heads.bentham": 90,
    "heads.regret": 90,
    "heads.surd": 90,
    "neural_emotion": 50,
    "neural_bentham": 50,
    "neural_regret": 50,
    "neural_surd": 50,
    "dsp": 50,
    "kalman": 50,
    "advanced_emotion": 20,
    "advanced_regret": 20,
    "advanced_bentham": 20,
    "advanced_surd": 20,
    "phase0": 10,
    "phase1": 10,
    "phase2": 10,
}

MODULES: tuple[str, ...] = tuple(m for members in GROUPS.values() for m in members)
GROUP_OF: dict[str, str] = {m: g for g, members in GROUPS.items() for m in members}


@dataclass(frozen=True)
class SelectionUnit:
    """One thing the sweet-spot analysis picks an epoch for: a linked group or an independent module."""

    name: str
    group: str
    modules: tuple[str, ...]


def selection_units() -> tuple[SelectionUnit, ...]:
    """Linked groups as one unit each, independent modules one unit apiece."""
    units = [SelectionUnit(g, g, GROUPS[g]) for g in LINKED_GROUPS]
    units += [SelectionUnit(m, "independent", (m,)) for m in GROUPS["independent"]]
    return tuple(units)


UNITS: tuple[str, ...] = tuple(u.name for u in selection_units())
"""Every selection unit's name, in declaration order: the units that train, step and stream apart."""
UNIT_MODULES: dict[str, tuple[str, ...]] = {u.name: u.modules for u in selection_units()}


def unit_priority(unit: SelectionUnit) -> int:
    """A unit's swap priority: its highest member's, since a linked group moves as one unit
    (group A holds the backbone, which is never swapped, so group A never is)."""
    return max(SWAP_PRIORITY[m] for m in unit.modules)


NEVER_SWAPPED = 100
"""Units of this priority stay on the GPU under every plan (the backbone, 100, is never swapped)."""


def modules_of_group(group: str) -> tuple[str, ...]:
    """The module keys of ``group``; a KeyError names the known groups."""
    if group not in GROUPS:
        raise KeyError(f"unknown group {group!r}; known: {', '.join(GROUPS)}")
    return GROUPS[group]


def param_prefix_owner(param_name: str) -> str:
    """The module key owning a state-dict key, e.g. 'heads.emotion.mlp.0.weight' -> 'heads.emotion'."""
    for module in sorted(MODULES, key=len, reverse=True):
        if param_name == module or param_name.startswith(module + "."):
            return module
    raise KeyError(f"state-dict key {param_name!r} belongs to no declared module")


def _check_declaration() -> None:
    assert set(MODULES) == set(MODULE_TASK) == set(SWAP_PRIORITY), "tables disagree on the module set"
    assert len(MODULES) == len(set(MODULES)), "a module is declared in two groups"
    for reader, sources in LINKS.items():
        for src in sources:
            assert GROUP_OF[reader] == GROUP_OF[src], f"cross-group link {reader} -> {src}"


_check_declaration()
