"""Model size presets: tiny (CPU tests), mid, and redheart-730m (the spec's sizes).

A preset is a plain dataclass of sizes; ``ModelConfig.preset`` picks one by name
from ``PRESETS``.  The module classes take their sizes from it and their output
sizes from the data set's TaskSpecs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict

from redheart_tune.model.groups import MODULE_TASK
from redheart_tune.model.tasks import TASKS


@dataclass(frozen=True)
class BackboneSize:
    d_model: int
    n_layers: int
    n_heads: int
    d_ffn: int


@dataclass(frozen=True)
class HeadSize:
    trunk: tuple[int, ...]
    """Widths of the MLP on the backbone's task feature (the first width is the backbone's d_model)."""
    n_experts: int
    """Experts of the gated mixture on the trunk's output."""
    d_expert: int
    n_blocks: int
    """Residual MLP blocks after the mixture."""


@dataclass(frozen=True)
class NeuralSize:
    trunk: tuple[int, ...]
    """Widths of the per-token MLP (the first width is the encoder's width, filled in at build time)."""
    n_heads: int
    """Heads of the self-attention over tokens before the RNN (0: no self-attention)."""
    rnn: Literal["lstm", "gru", "none"]
    d_rnn: int
    """Hidden size per direction of the bidirectional RNN."""
    rnn_layers: int
    n_experts: int
    """Experts of the gated mixture on the pooled summary (0: none)."""
    d_expert: int
    d_out: int
    """Hidden width of the output MLP."""


@dataclass(frozen=True)
class AdvancedSize:
    d_model: int
    n_layers: int
    n_heads: int
    d_ffn: int
    n_experts: int
    d_expert: int


@dataclass(frozen=True)
class DSPSize:
    d_hidden: int
    n_bands: int
    n_heads: int
    kernel: int
    """Width of the temporal (resonance) convolution over tokens."""
    hop: int
    """Tokens per frame of the signal the Kalman filter reads (a shorter recursion)."""


@dataclass(frozen=True)
class PhaseSize:
    phase0: tuple[int, ...]
    """Hidden widths of the calibrator MLP on the pooled vector."""
    phase1: int
    """Hidden width of the empathy learner."""
    phase2: AdvancedSize
    """The community network's interaction layers (n_experts unused: it has none)."""


@dataclass(frozen=True)
class Preset:
    backbone: BackboneSize
    heads: dict[str, HeadSize]
    """Per task."""
    neural: dict[str, NeuralSize]
    """Per task."""
    d_exchange: int
    """Width of the messages the neural analyzers exchange."""
    n_exchange_heads: int
    dsp: DSPSize
    advanced: dict[str, AdvancedSize]
    """Per task."""
    phases: PhaseSize

    def __post_init__(self) -> None:
        for table in (self.heads, self.neural, self.advanced):
            assert set(table) == set(TASKS), f"preset tables need exactly the tasks {TASKS}"


# tiny: for tests and CPU smoke runs; a training step of batch 32 x 48 tokens in a few hundredths of
# a second on 2 CPU cores.  Every module reads all tokens and a step is dominated by per-op overhead,
# so tiny keeps token-level widths and layers minimal (one Transformer layer, one RNN) and puts its
# parameters in the vector-level parts.  The code paths tiny leaves out (self-attention and GRUs in
# the neural analyzers, Transformer layers in advanced/phase2) are trained in tests on their own and
# by the mid preset.
_TINY_HEAD = HeadSize(trunk=(32, 128, 96), n_experts=4, d_expert=128, n_blocks=1)
_TINY_ADV = AdvancedSize(d_model=32, n_layers=0, n_heads=2, d_ffn=64, n_experts=4, d_expert=128)

TINY = Preset(
    backbone=BackboneSize(d_model=32, n_layers=1, n_heads=4, d_ffn=64),
    heads={t: _TINY_HEAD for t in TASKS},
    neural={
        "emotion": NeuralSize((32,), 0, "lstm", 16, 1, 4, 128, 64),
        "bentham": NeuralSize((32,), 0, "none", 0, 0, 4, 128, 64),
        "regret": NeuralSize((32,), 0, "none", 0, 0, 4, 128, 64),
        "surd": NeuralSize((32,), 0, "none", 0, 0, 4, 128, 64),
    },
    d_exchange=32,
    n_exchange_heads=4,
    dsp=DSPSize(d_hidden=32, n_bands=8, n_heads=2, kernel=3, hop=4),
    advanced={t: _TINY_ADV for t in TASKS},
    phases=PhaseSize(phase0=(1024, 256), phase1=64, phase2=_TINY_ADV),
)

MID = Preset(
    backbone=BackboneSize(d_model=256, n_layers=4, n_heads=8, d_ffn=1024),
    heads={
        "emotion": HeadSize((256, 512, 384, 256), 8, 256, 1),
        "bentham": HeadSize((256, 384, 256, 192), 6, 256, 2),
        "regret": HeadSize((256, 512, 384, 256), 4, 256, 3),
        "surd": HeadSize((256, 384, 256, 192), 4, 256, 2),
    },
    neural={
        "emotion": NeuralSize((512, 512, 384), 8, "lstm", 256, 2, 8, 512, 384),
        "bentham": NeuralSize((512, 512, 384, 256), 8, "gru", 192, 2, 0, 0, 384),
        "regret": NeuralSize((512, 512, 384, 384), 0, "lstm", 256, 2, 0, 0, 512),
        "surd": NeuralSize((384, 384, 256, 192), 0, "none", 0, 0, 4, 256, 256),
    },
    d_exchange=128,
    n_exchange_heads=4,
    dsp=DSPSize(d_hidden=192, n_bands=48, n_heads=4, kernel=5, hop=4),
    advanced={
        "emotion": AdvancedSize(256, 4, 8, 1024, 8, 512),
        "regret": AdvancedSize(256, 3, 8, 1024, 8, 512),
        "bentham": AdvancedSize(256, 5, 8, 1024, 8, 512),
        "surd": AdvancedSize(192, 2, 4, 768, 4, 256),
    },
    phases=PhaseSize(phase0=(768, 448), phase1=128, phase2=AdvancedSize(256, 2, 8, 1024, 0, 0)),
)

REDHEART_730M = Preset(
    backbone=BackboneSize(d_model=896, n_layers=8, n_heads=14, d_ffn=3584),
    heads={
        "emotion": HeadSize((896, 1536, 1152, 768), 4, 1792, 1),
        "bentham": HeadSize((896, 1152, 768, 576), 8, 960, 2),
        "regret": HeadSize((896, 1536, 1152, 768), 6, 1472, 1),
        "surd": HeadSize((896, 1152, 768, 576), 8, 896, 1),
    },
    neural={
        "emotion": NeuralSize((2048, 2048, 1536), 16, "lstm", 1024, 3, 8, 896, 1024),
        "bentham": NeuralSize((2048, 2048, 1536, 1024), 16, "gru", 768, 4, 6, 1152, 512),
        "regret": NeuralSize((2048, 2048, 1536, 1536), 0, "lstm", 1024, 4, 8, 1280, 1024),
        "surd": NeuralSize((1536, 1536, 1024, 768), 0, "none", 0, 0, 6, 640, 512),
    },
    d_exchange=512,
    n_exchange_heads=8,
    dsp=DSPSize(d_hidden=432, n_bands=96, n_heads=8, kernel=5, hop=4),
    advanced={
        "emotion": AdvancedSize(768, 6, 12, 3072, 8, 1600),
        "regret": AdvancedSize(768, 5, 12, 3072, 4, 1280),
        "bentham": AdvancedSize(768, 8, 12, 3072, 8, 1536),
        "surd": AdvancedSize(448, 2, 8, 1792, 4, 640),
    },
    phases=PhaseSize(phase0=(1536, 896), phase1=256, phase2=AdvancedSize(512, 2, 8, 2144, 0, 0)),
)

PRESETS: dict[str, Preset] = {"tiny": TINY, "mid": MID, "redheart-730m": REDHEART_730M}

# Logged parameter counts of the first implementation's 730M run, the sizes
# redheart-730m reproduces within 3%.  DSP and Kalman are counted together.
TARGETS_730M: dict[tuple[str, ...], int] = {
    ("backbone",): 90_600_000,
    ("heads.emotion",): 17_300_000,
    ("heads.bentham",): 13_900_000,
    ("heads.regret",): 19_900_000,
    ("heads.surd",): 12_000_000,
    ("neural_emotion",): 122_600_000,
    ("neural_bentham",): 78_300_000,
    ("neural_regret",): 153_900_000,
    ("neural_surd",): 13_500_000,
    ("dsp", "kalman"): 2_300_000,
    ("advanced_emotion",): 63_000_000,
    ("advanced_regret",): 44_200_000,
    ("advanced_bentham",): 75_800_000,
    ("advanced_surd",): 7_600_000,
    ("phase0",): 2_000_000,
    ("phase1",): 200_000,
    ("phase2",): 7_000_000,
}
TOTAL_730M: tuple[int, int] = (722_000_000, 738_000_000)
"""Accepted range of redheart-730m's total (the original logged 722.8M and 730.5M)."""


def _number(value: Any) -> Any:
    # PyYAML reads 1e-5 (an exponent without a dot) as a string: one that spells a number is that number.
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


Float = Annotated[float, Strict(), BeforeValidator(_number)]
"""A config number: an int, or a string that spells a number, becomes a float; a bool is refused."""

FusedModule = Literal[tuple(m for m, task in MODULE_TASK.items() if task is not None)]
"""The modules that predict a task, so have a weight in its fused prediction."""


class ModelConfig(BaseModel):
    """The ``model`` section of the config (redheart_tune/config.py): which preset, with what dropout and fusion."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    preset: Literal["tiny", "mid", "redheart-730m"] = "tiny"
    """Size preset; see PRESETS."""
    dropout: Float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout everywhere (kept low on purpose: overfitting is induced, and the sweet-spot analysis finds where)."""
    fusion_weights: dict[FusedModule, Annotated[Float, Field(ge=0.0)]] = {}
    """Weight of a module in its task's fused prediction (module key -> weight; missing keys weigh 1)."""

    @property
    def sizes(self) -> Preset:
        """The preset's sizes; a KeyError names the known presets."""
        if self.preset not in PRESETS:
            raise KeyError(f"unknown model preset {self.preset!r}; known: {', '.join(PRESETS)}")
        return PRESETS[self.preset]
