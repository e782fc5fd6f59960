"""An experiment's one stored config (``redheart_config.json``) and what may differ from it.

Reusing or resuming an experiment with a config that differs in a field that changes results is refused
(``check_same_config``); a resume may change a few fields, recorded with the epoch they apply from
(``resume_config``).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from redheart_tune.config import Config, cache_dir, config_from_dict, config_to_dict, is_uri, with_overrides
from redheart_tune.layout import CONFIG_FILE, SPLIT_FILE
from redheart_tune.tune.recovery import ExperimentError, checkpoint_epochs
from redheart_tune.tune.storage import push
from redheart_tune.util.files import write_json_atomic

NO_RESULT_CHANGE = (
    "resources",
    "memory",
    "run.name",
    "run.output_root",
    "run.local_dir",
    "data.cache_dir",
    "train.progress_every_s",
    "data.holdout",
    "data.holdout_max_samples",
    "analysis",
)
"""Config fields that never change a run's results: where it runs and with what resources, how memory
is managed, where files go.  Every other field does, and a difference in it refuses a reuse or resume."""
NOT_READ_BY = {"sweep": ("train", "optim.lr"), "train": ("sweep", "train.use_sweep_lr")}
"""Fields an experiment does not read: the sweep takes its LRs from sweep.lrs; a training run's stored
optim.lr is the LR it really used, so where that came from (train.use_sweep_lr) does not matter."""


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(
    stored: Config, current: Config, ignore: tuple[str, ...] = (), *, every_field: bool = False
) -> list[tuple[str, Any, Any]]:
    """(key, stored value, current value) of every field that differs and changes results (with
    ``every_field``, of every field that differs)."""
    skip = ignore if every_field else (*NO_RESULT_CHANGE, *ignore)
    a, b = _flatten(config_to_dict(stored)), _flatten(config_to_dict(current))
    # A data file named relative to the working directory, then made absolute, is the same file.
    for flat in (a, b):
        if flat.get("data.path") and not is_uri(flat["data.path"]):
            flat["data.path"] = str(Path(flat["data.path"]).expanduser().resolve())
    return [
        (key, a.get(key, "<absent>"), b.get(key, "<absent>"))
        for key in sorted(a.keys() | b.keys())
        if not any(key == s or key.startswith(f"{s}.") for s in skip) and a.get(key) != b.get(key)
    ]


def save_experiment_config(cfg: Config, path: Path, stage: str, **extra: Any) -> None:
    """The experiment's one stored config (for reuse and ``resume``; ``extra`` fields beside it, such as the
    seeds of ``all --seeds N``) and the data split with every record id."""
    from redheart_tune.data import prepare_data

    write_json_atomic(path / CONFIG_FILE, {"stage": stage, "config": config_to_dict(cfg), **extra})
    split = prepare_data(cfg.data, cache_dir(cfg), show_progress=False).split_record()
    write_json_atomic(path / SPLIT_FILE, split)
    push(cfg, path / CONFIG_FILE, path / SPLIT_FILE)


def load_experiment_config(path: Path) -> tuple[Config, str]:
    """The config and stage an experiment was started with."""
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise ExperimentError(f"{f}: not found; {path} is not an experiment started by run.py")
    raw = json.loads(f.read_text())
    return config_from_dict(raw["config"], str(f)), raw["stage"]


RESUME_MAY_CHANGE = ("optim.lr", "optim.grad_clip", "optim.eval_batch_size")
"""Besides NO_RESULT_CHANGE, what ``resume`` may change in a training run: they act from the resumed
epoch on and are recorded in the experiment's history (a lower LR or clipping after a NaN loss, a
smaller evaluation batch after running out of memory)."""


def resume_config(path: Path, overrides: list[str]) -> tuple[Config, str]:
    """The config to resume the experiment at ``path`` with: the stored one, plus ``overrides`` of the
    fields a resume may change; the change is stored, with the epoch it applies from, in the history."""
    stored, stage = load_experiment_config(path)
    if not overrides:
        return stored, stage
    cfg = with_overrides(stored, overrides, str(path / CONFIG_FILE))
    allowed = RESUME_MAY_CHANGE if stage == "train" else ()
    refused = config_differences(stored, cfg, allowed)
    if refused:
        listed = "; ".join(f"{key}: {old!r} stored, {new!r} asked" for key, old, new in refused)
        may = ", ".join([*NO_RESULT_CHANGE, *allowed])
        raise ExperimentError(
            f"{path}: a resume cannot change {listed}. It may change {may}; for anything else start a "
            "new run (another run.name)."
        )
    changed = {key: [old, new] for key, old, new in config_differences(stored, cfg, every_field=True)}
    record = json.loads((path / CONFIG_FILE).read_text())
    record["config"] = config_to_dict(cfg)
    record.setdefault("history", []).append(
        {
            "time": datetime.now(timezone.utc).isoformat(),
            "overrides": list(overrides),
            "changed": changed,
            "from_epoch": newest_checkpoint_epoch(path) + 1,
        }
    )
    write_json_atomic(path / CONFIG_FILE, record)
    push(cfg, path / CONFIG_FILE)
    return cfg, stage


def newest_checkpoint_epoch(path: Path) -> int:
    """The epoch of the newest complete checkpoint under an experiment (0 when there is none)."""
    return max((e for trial in Path(path).glob("*") if trial.is_dir() for e in checkpoint_epochs(trial)), default=0)


def check_same_config(path: Path, cfg: Config, stage: str, ignore: tuple[str, ...] = ()) -> None:
    """Refuse to reuse or resume the experiment at ``path`` with a config that would change its results."""
    stored, stored_stage = load_experiment_config(path)
    if stored_stage != stage:
        raise ExperimentError(f"{path} holds a {stored_stage} experiment, not a {stage} experiment")
    diffs = config_differences(stored, cfg, (*NOT_READ_BY[stage], *ignore))
    if diffs:
        listed = "; ".join(f"{key}: {old!r} stored, {new!r} now" for key, old, new in diffs)
        raise ExperimentError(
            f"{path} was run with another configuration ({listed}). Rerun with the stored values, "
            f"or choose another run.name for a new run."
        )
