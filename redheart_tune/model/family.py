"""The assembled Red Heart model: every module of groups.py, their outputs, and the fused prediction.

Dependency rule (groups.py): a module reads only the encoder's output
(tokens, mask, pooled) and the modules it is linked to in ``LINKS``, which are
always in its own group.  So the heads read the backbone, the neural analyzers
read each other's messages, the Kalman filter reads the DSP's signal, and the
independent modules read the encoder alone.  That is what makes a model whose
groups come from different epochs' checkpoints a sound model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.utils.checkpoint

from redheart_tune.model.analyzers import AdvancedAnalyzer, NeuralAnalyzer
from redheart_tune.model.backbone import Backbone
from redheart_tune.model.dsp import DynamicKalmanFilter, EmotionDSPSimulator
from redheart_tune.model.groups import (
    GROUP_OF,
    GROUPS,
    MODULE_TASK,
    MODULES,
    modules_of_group,
    param_prefix_owner,
    selection_units,
)
from redheart_tune.model.heads import TaskHead
from redheart_tune.model.phases import Phase0EmotionCalibrator, Phase1EmpathyLearner, Phase2CommunityNetwork
from redheart_tune.model.presets import ModelConfig
from redheart_tune.model.tasks import TASKS, TaskSpec


def check_tasks(tasks: dict[str, TaskSpec]) -> None:
    """The model needs exactly the four tasks, each under its own name."""
    if set(tasks) != set(TASKS):
        raise ValueError(f"tasks must be exactly {TASKS}; got {tuple(tasks)}")
    for name, spec in tasks.items():
        if spec.name != name:
            raise ValueError(f"tasks[{name!r}] is the TaskSpec of {spec.name!r}")


class RedHeart(nn.Module):
    """All 18 modules; attribute paths equal the module keys of groups.py ("heads.emotion", "dsp", ...)."""

    def __init__(self, cfg: ModelConfig, tasks: dict[str, TaskSpec], input_dim: int):
        super().__init__()
        check_tasks(tasks)
        s, p = cfg.sizes, cfg.dropout
        # Output size of every predicting module, from the task groups.py assigns it.
        out = {m: tasks[t].dim for m, t in MODULE_TASK.items() if t is not None}

        # group A
        self.backbone = Backbone(input_dim, s.backbone, p)
        self.heads = nn.ModuleDict({t: TaskHead(s.heads[t], out[f"heads.{t}"], p) for t in TASKS})
        # group B
        x, xh = s.d_exchange, s.n_exchange_heads
        self.neural_emotion = NeuralAnalyzer(input_dim, s.neural["emotion"], x, xh, out["neural_emotion"], p)
        self.neural_bentham = NeuralAnalyzer(input_dim, s.neural["bentham"], x, xh, out["neural_bentham"], p)
        self.neural_regret = NeuralAnalyzer(input_dim, s.neural["regret"], x, xh, out["neural_regret"], p)
        self.neural_surd = NeuralAnalyzer(input_dim, s.neural["surd"], x, xh, out["neural_surd"], p)
        # group C: the Kalman state has the size of the DSP's signal it filters
        self.dsp = EmotionDSPSimulator(input_dim, s.dsp, out["dsp"])
        assert out["kalman"] == out["dsp"], "kalman and dsp must predict the same task"
        self.kalman = DynamicKalmanFilter(out["kalman"])
        # independent
        self.advanced_emotion = AdvancedAnalyzer(input_dim, s.advanced["emotion"], out["advanced_emotion"], p)
        self.advanced_regret = AdvancedAnalyzer(input_dim, s.advanced["regret"], out["advanced_regret"], p)
        self.advanced_bentham = AdvancedAnalyzer(input_dim, s.advanced["bentham"], out["advanced_bentham"], p)
        self.advanced_surd = AdvancedAnalyzer(input_dim, s.advanced["surd"], out["advanced_surd"], p)
        self.phase0 = Phase0EmotionCalibrator(input_dim, s.phases.phase0, out["phase0"], p)
        self.phase1 = Phase1EmpathyLearner(input_dim, s.phases.phase1, out["phase1"], p)
        self.phase2 = Phase2CommunityNetwork(input_dim, s.phases.phase2, out["phase2"], p)

    def module(self, key: str) -> nn.Module:
        """The submodule of a module key of groups.py, e.g. "heads.emotion"."""
        if key not in MODULES:
            raise KeyError(f"unknown module key {key!r}; known: {', '.join(MODULES)}")
        return self.get_submodule(key)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Raw prediction (B, task dim) of every module that has a task: logits or regression values.

        tokens (B, T, E): the sentence encoder's token embeddings; mask (B, T) bool,
        True on real tokens, right-padded, at least one per row; pooled (B, E): the
        encoder's sentence vector.
        """
        check_inputs(tokens, mask, pooled)
        lengths = mask.sum(1).cpu()  # once for every RNN (one device sync on a GPU)
        out: dict[str, torch.Tensor] = {}
        for unit in selection_units():
            out.update(self.forward_unit(unit.name, tokens, mask, pooled, lengths=lengths))
        return out

    def forward_unit(
        self,
        unit: str,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        pooled: torch.Tensor,
        record: Recorder | None = None,
        lengths: torch.Tensor | None = None,
        checkpoint: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The predictions of one selection unit's modules, computed from the encoder output alone.

        A unit reads nothing but the encoder's output and its own modules, so the
        units can run in any order, each with only its own weights on the device
        (tune/memory streams them this way).  ``record(module, tensor)``, when
        given, receives each module's main activation: the backbone's task
        features, each neural analyzer's summary and message, every other module's
        output.  ``lengths``: the rows' real tokens as a CPU tensor, so the RNNs pack without
        reading the mask back from the device.  ``checkpoint``: keep only what each neural
        analyzer's summary needs and recompute the rest in backward (group B's activations then
        take one analyzer's room, so a larger pass fits; the same numbers, dropout included).
        Inputs are not checked here (``check_inputs`` once per batch).
        """
        note = record or _ignore
        out: dict[str, torch.Tensor] = {}
        if unit == "group_a":
            # each head reads its own task feature of the backbone
            features = self.backbone(tokens, mask)  # {task: (B, d_model)}
            for t in TASKS:
                note("backbone", features[t])
            for t, head in self.heads.items():
                out[f"heads.{t}"] = head(features[t])
        elif unit == "group_b":
            # all four summarize, then each predicts after hearing the other three
            analyzers = {t: self.module(f"neural_{t}") for t in TASKS}
            if checkpoint:
                said = {
                    t: torch.utils.checkpoint.checkpoint(
                        a.summarize, tokens, mask, lengths, use_reentrant=False
                    )
                    for t, a in analyzers.items()
                }
            else:
                said = {
                    t: a.summarize(tokens, mask, lengths) for t, a in analyzers.items()
                }  # {task: (summary, message)}
            for t, a in analyzers.items():
                note(f"neural_{t}", said[t][0])
                note(f"neural_{t}", said[t][1])
                others = torch.stack([said[o][1] for o in TASKS if o != t], dim=1)  # (B, 3, X)
                out[f"neural_{t}"] = a.predict(said[t][0], said[t][1], others)
        elif unit == "group_c":
            # the Kalman filter runs over the DSP's signal frames
            out["dsp"], frames, frame_mask = self.dsp(tokens, mask)
            note("dsp", frames)
            out["kalman"] = self.kalman(frames, frame_mask)
        elif unit == "phase0":
            out["phase0"] = self.phase0(pooled)
        elif unit in GROUPS["independent"]:
            # the encoder's output only
            out[unit] = self.module(unit)(tokens, mask, pooled)
        else:
            raise KeyError(f"unknown unit {unit!r}; known: {', '.join(u.name for u in selection_units())}")
        for module, pred in out.items():
            note(module, pred)
        return out


Recorder = Callable[[str, torch.Tensor], None]
"""``record(module, activation)``: a callback ``RedHeart.forward_unit`` calls with module activations."""


def _ignore(module: str, tensor: torch.Tensor) -> None:
    pass


def check_inputs(tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> None:
    """The encoder-output contract every module relies on (one device sync; once per batch)."""
    B, T, _ = tokens.shape
    assert mask.shape == (B, T) and mask.dtype == torch.bool, "mask must be (B, T) bool"
    assert pooled.shape == (B, tokens.shape[2]), "pooled must be (B, E)"
    lengths = mask.sum(1, keepdim=True)  # (B, 1)
    right_padded = mask == (torch.arange(T, device=mask.device) < lengths)
    assert bool((lengths > 0).all() & right_padded.all()), (
        "mask must be right-padded with at least one real token per row"
    )


def build_model(cfg: ModelConfig, tasks: dict[str, TaskSpec], input_dim: int) -> RedHeart:
    """The model of ``cfg.preset`` for these tasks over an encoder of width ``input_dim``."""
    return RedHeart(cfg, tasks, input_dim)


def fuse(
    outputs: dict[str, torch.Tensor], tasks: dict[str, TaskSpec], fusion_weights: dict[str, float]
) -> dict[str, torch.Tensor]:
    """The system's prediction per task from every module in ``outputs`` predicting it (no trained parameters).

    Classification kinds: weighted mean of the modules' softmax probabilities (B, C),
    a distribution.  Regression: weighted mean of the values (B, dim).  A module's
    weight is ``fusion_weights[module]``, 1.0 where missing.
    """
    fused = {}
    for task, spec in tasks.items():
        members = [m for m in outputs if MODULE_TASK.get(m) == task]
        if not members:
            continue
        weights = [fusion_weights.get(m, 1.0) for m in members]
        if sum(weights) <= 0:
            raise ValueError(
                f"fusion weights of task {task!r} sum to zero: {dict(zip(members, weights, strict=True))}"
            )
        preds = [
            torch.softmax(outputs[m].float(), -1) if spec.is_classification else outputs[m] for m in members
        ]
        fused[task] = sum(w * p for w, p in zip(weights, preds, strict=True)) / sum(weights)
    return fused


def param_counts(model: nn.Module) -> dict[str, int]:
    """Number of parameters of each module key, in groups.py's order."""
    counts = dict.fromkeys(MODULES, 0)
    for name, p in model.named_parameters():
        counts[param_prefix_owner(name)] += p.numel()
    return counts


def group_param_counts(model: nn.Module) -> dict[str, int]:
    """Number of parameters of each group."""
    counts = param_counts(model)
    return {g: sum(counts[m] for m in members) for g, members in GROUPS.items()}


def group_state_dict(model: nn.Module, group: str) -> dict[str, torch.Tensor]:
    """The state-dict entries of ``group``'s modules (keys as in the full model's state dict)."""
    modules_of_group(group)  # a KeyError names the known groups
    return {k: v for k, v in model.state_dict().items() if GROUP_OF[param_prefix_owner(k)] == group}
