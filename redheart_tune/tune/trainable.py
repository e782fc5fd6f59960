"""The Tune function trainable: build -> resume -> loop -> report / checkpoint.

One epoch loop (``run_trial``) serves both phases; what differs is a ``Trial``:

- ``SWEEP``: the trial's own LR (``params["lr"]``) for ``sweep.epochs``, no checkpoints, and a NaN
  loss is a result (the LR diverged) that ends the trial with an infinite score;
- ``TRAIN``: ``optim.lr`` for ``train.epochs``, a checkpoint every ``train.checkpoint_every`` epochs
  and after the last, and a NaN loss stops the run (earlier checkpoints stay; ``resume`` continues).

Epochs count from 1, so epoch 2k is checkpoint k and lines up with Tune's ``training_iteration``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from ray.tune import Checkpoint, get_checkpoint, report

from redheart_tune import __version__
from redheart_tune.config import Config, cache_dir, config_to_dict
from redheart_tune.data import EncodedData, prepare_data
from redheart_tune.engine.checkpoints import (
    META,
    CheckpointError,
    load_model_state,
    load_resume_state,
    measured_size,
    plan_space,
    verify_checkpoint,
    write_checkpoint,
    write_timing,
)
from redheart_tune.engine.loop import NonFiniteLossError, TrainingState, build_training, train_epoch
from redheart_tune.engine.memory import GiB, configure_allocator, format_plan, out_of_memory, trial_budget
from redheart_tune.engine.progress import Progress, trial_files
from redheart_tune.engine.stats import peak_memory_mb, weight_stats
from redheart_tune.engine.validation import validate_state
from redheart_tune.model.groups import GROUPS, MODULE_TASK
from redheart_tune.tune.resources import describe_device, trial_device, trial_threads
from redheart_tune.util.console import quiet_trial
from redheart_tune.util.faults import FAULT, OutOfSpaceError, checkpoint_sizes, out_of_space, space_line
from redheart_tune.util.files import write_json_atomic
from redheart_tune.util.timing import timed

log = logging.getLogger(__name__)

# The scalar columns every epoch reports (``epoch_metrics``), in the order the sweep's per-LR CSVs use.
EPOCH_COLUMNS = [
    "epoch",
    "train_loss",
    "val_loss",
    "train_acc",
    "val_acc",
    "grad_norm",
    "peak_memory_mb",
    "memory_kind",
    "epoch_time_s",
    "lr",
    "lr_peak",
]


def is_checkpoint_epoch(epoch: int, cfg: Config) -> bool:
    return epoch % cfg.train.checkpoint_every == 0 or epoch == cfg.train.epochs


def selection_score(train_losses: list[float], val_losses: list[float], overfit_weight: float) -> float:
    """The sweep's rule: mean of the last 3 val losses + w * |train - val| at the last epoch."""
    last = val_losses[-3:]
    return float(np.mean(last)) + overfit_weight * abs(train_losses[-1] - val_losses[-1])


class Trial:
    """What a kind of trial decides: its LR and epochs, which epochs checkpoint, what a NaN loss means."""

    name: str

    def lr(self, params: dict, cfg: Config) -> float:
        raise NotImplementedError

    def epochs(self, cfg: Config) -> int:
        raise NotImplementedError

    def saves(self, epoch: int, cfg: Config) -> bool:
        return False

    def diverged(self, cfg: Config, lr: float, epoch: int, exc: NonFiniteLossError, progress: Progress) -> None:
        """A loss became non-finite in ``epoch``: end the trial (return) or stop the run (raise)."""
        raise exc


class SweepTrial(Trial):
    """One LR of the sweep: the trial's own LR, no checkpoints; a diverging LR is a result, not a failure."""

    name = "sweep"

    def lr(self, params: dict, cfg: Config) -> float:
        return float(params["lr"])

    def epochs(self, cfg: Config) -> int:
        return cfg.sweep.epochs

    def diverged(self, cfg, lr, epoch, exc, progress) -> None:
        log.warning("lr %.1e diverged: %s", lr, exc)
        progress.close("diverged")
        report(diverged_row(epoch, lr, str(exc)))


class TrainTrial(Trial):
    """The main training: its config's LR (a resume may lower it after a NaN), checkpoints, and a NaN
    loss that stops the run with its settings remembered (a retry with the same ones would only repeat)."""

    name = "train"

    def lr(self, params: dict, cfg: Config) -> float:
        return cfg.optim.lr

    def epochs(self, cfg: Config) -> int:
        return cfg.train.epochs

    def saves(self, epoch: int, cfg: Config) -> bool:
        return is_checkpoint_epoch(epoch, cfg)

    def diverged(self, cfg, lr, epoch, exc, progress) -> None:
        remember_divergence(cfg, lr, exc)
        raise exc  # training stops with the error; earlier checkpoints stay intact


SWEEP, TRAIN = SweepTrial(), TrainTrial()
TRIALS: dict[str, Trial] = {t.name: t for t in (SWEEP, TRAIN)}


def run_trial(
    params: dict,
    *,
    cfg: Config,
    trial: Trial,
    data: EncodedData | None = None,
    resume_from: str | None = None,
) -> None:
    """One Tune trial of ``trial``'s kind (``SWEEP``: ``params["lr"]`` is its peak LR; ``TRAIN``).
    ``data``: the encoded data, shipped through the object store on a cluster
    (``tune.runner.trainable_for``); else it is read from the encoding cache.  ``resume_from``: a
    checkpoint directory to continue from when Tune has none to give (``tune.recovery``).

    A write that fails for lack of space (ENOSPC, EDQUOT, EROFS) is not retried: the trial reports one
    line (``tune.faults``) and the driver stops the run."""
    quiet_trial()  # no Ray line per checkpoint, no traceback from the worker's exit (redheart_tune/util/console.py)
    sizes: dict[str, tuple[int, int]] = {}  # one checkpoint's bytes, once the model is built
    try:
        _run_trial(params, cfg=cfg, trial=trial, data=data, resume_from=resume_from, sizes=sizes)
    except OSError as exc:
        fault = out_of_space(exc)
        if fault is None:
            raise
        line = space_line(fault, trial_files()[0], sizes.get("checkpoint"))
        report({FAULT: line})  # FaultStop ends the experiment on this report, before Tune writes it
        raise OutOfSpaceError(line) from None  # only reached when the driver has no FaultStop


def _run_trial(
    params: dict,
    *,
    cfg: Config,
    trial: Trial,
    data: EncodedData | None,
    resume_from: str | None,
    sizes: dict,
) -> None:
    if "seed" in params:  # one trial of several seeds' training (all --seeds N)
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": int(params["seed"])})})
    lr, epochs = trial.lr(params, cfg), trial.epochs(cfg)
    # Steps, samples/s and ETAs inside each epoch: the console line, live_progress.json, TensorBoard.
    directory, upload_lag_s = trial_files()
    progress = Progress(
        directory,
        stage=trial.name,
        lr_peak=lr,
        epochs=epochs,
        print_every_s=cfg.train.progress_every_s,
        upload_lag_s=upload_lag_s,
    )
    threads = trial_threads(cfg)  # the CPUs Ray gave this trial, one left for Ray on a small machine
    torch.set_num_threads(threads)
    import ray

    setup_s: dict[str, float] = {}
    with timed(setup_s, "device"):
        configure_allocator()  # before the first CUDA allocation of this worker
        device = trial_device(ray.get_gpu_ids())
        budget = trial_budget(cfg, device, cfg.resources.gpu)  # on a GPU: CUDA's context, measured
    with timed(setup_s, "data"):
        if data is None:
            data = prepare_data(cfg.data, cache_dir(cfg), show_progress=False)
    state = build_training(cfg, data, lr, epochs, device, budget=budget)
    setup_s.update(state.setup_s)
    sizes["checkpoint"] = checkpoint_sizes(state.model)
    if state.placement.managed:
        log.warning(
            "%s trial on %s\n%s", trial.name, describe_device(device)["name"], format_plan(state.placement.plan)
        )
    history: dict[str, list[float]] = {"train": [], "val": []}
    # Since the last checkpoint: every optimizer step's LR (warm-up and restarts, visible), every move
    # of a unit between GPU and CPU, every unit turn's peak memory use (the DSM figure's data).
    lr_log: list[dict] = []
    moves: list[dict] = []
    trace: list[dict] = []

    start, size = 1, None
    checkpoint = get_checkpoint()
    if checkpoint is None and resume_from is not None:  # Tune's record was lost; tune.recovery chose this one
        checkpoint = Checkpoint.from_directory(resume_from)
    if checkpoint is not None:
        with timed(setup_s, "restore"), checkpoint.as_directory() as ckpt_dir:
            start = restore(state, Path(ckpt_dir), cfg, data) + 1
            history = json.loads((Path(ckpt_dir) / META).read_text())["loss_history"]
            size = measured_size(Path(ckpt_dir))
        log.warning("resumed %s trial at epoch %d from %s", trial.name, start, checkpoint.path)
    progress.started_after(setup_s)
    refuse_known_divergence(cfg, lr)
    saves = [e for e in range(start, epochs + 1) if trial.saves(e, cfg)]
    space = plan_space(state.model, size, cfg.train.keep_resume_state, saves)  # warns if they will not fit

    for epoch in range(start, epochs + 1):
        save = trial.saves(epoch, cfg)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            tr = train_epoch(
                state, data, epoch, collect_grad_stats=save, on_step=progress.hook(state.placement)
            )
        except NonFiniteLossError as exc:
            trial.diverged(cfg, lr, epoch, exc, progress)
            return
        except torch.OutOfMemoryError as exc:
            raise out_of_memory(exc, state.placement.plan, budget, f"in epoch {epoch}") from exc
        try:
            val = validate_state(state, data, collect_activations=save)
        except torch.OutOfMemoryError as exc:
            raise out_of_memory(
                exc, state.placement.plan, budget, "in validation (optim.eval_batch_size)"
            ) from exc
        progress.end_epoch(epoch)
        lr_log += [{"epoch": epoch, "step_in_epoch": i + 1, "lr": v} for i, v in enumerate(tr.lrs)]
        moves += tr.memory_moves
        trace += tr.memory_trace
        history["train"].append(tr.loss)
        history["val"].append(val.loss)
        metrics = epoch_metrics(epoch, tr, val, device, cfg, history, lr, data.tasks)
        metrics.update(memory_metrics(state, tr))
        if epoch == start and progress.startup is not None:  # what this trial's start cost, once
            metrics["startup_s"] = progress.startup["total_s"]
            metrics["first_step_extra_s"] = progress.startup["first_step_extra_s"]
        metrics["node_id"] = ray.get_runtime_context().get_node_id()  # which node of a cluster ran it
        if not save:
            report(metrics)
            continue
        detail = {
            **metrics,
            "train": {"loss": tr.loss, "accuracy": tr.accuracy, "grad_norm": tr.grad_norm},
            "lr_log": lr_log,
            "val": {
                "loss": val.loss,
                "accuracy": val.accuracy,
                "module_loss": val.module_loss,
                "module_metric": val.module_metric,
                "task_metric": val.task_metric,
            },
            "grad_stats": tr.grad_stats,
            "weight_stats": weight_stats(state.model),  # drain() in train_epoch synchronised the copies
            "activation_stats": val.activations,
            "memory": memory_record(state, budget, moves, trace),
        }
        meta = checkpoint_meta(epoch, cfg, data, lr, device, history)
        state.placement.synchronize()  # every copy home has landed before the weights are read
        space.before_write(epoch)  # a checkpoint that cannot fit stops the trial before it is written
        with tempfile.TemporaryDirectory(prefix="redheart-ckpt-") as tmp:
            ckpt_dir = write_checkpoint(
                Path(tmp) / f"epoch_{epoch:04d}",
                model_state=state.model.state_dict(),
                metrics=detail,
                meta=meta,
                resume_state=resume_state(state, epoch),  # the driver prunes older copies (ResumeStatePruner)
            )
            written = write_timing(ckpt_dir)  # also logged: "checkpoint N: wrote X GB in Y s, hashed in Z s"
            space.size = measured_size(ckpt_dir)
            metrics["checkpoint_gb"] = written["bytes"] / 1e9
            metrics["checkpoint_write_s"] = written["write_s"]
            metrics["checkpoint_hash_s"] = written["hash_s"]
            report(metrics, checkpoint=Checkpoint.from_directory(str(ckpt_dir)))
        lr_log, moves, trace = [], [], []


DIVERGED_FILE = "diverged.json"
"""In a training trial's directory: the settings a NaN loss came with, so a restart does not try them again."""


def remember_divergence(cfg: Config, lr: float, exc: NonFiniteLossError) -> None:
    """Note the LR and clipping that diverged, for ``refuse_known_divergence``."""
    from ray.tune import get_context

    record = {"lr": lr, "grad_clip": cfg.optim.grad_clip, "error": str(exc)}
    write_json_atomic(Path(get_context().get_trial_dir()) / DIVERGED_FILE, record)


def refuse_known_divergence(cfg: Config, lr: float) -> None:
    """A restarted training trial (resources.max_failures) whose settings already gave a NaN loss stops at
    once: the same settings diverge again, so retrying would only repeat epochs.  A resume with a new LR or
    clipping (``run.py resume ... optim.lr=``) goes on."""
    from ray.tune import get_context

    path = Path(get_context().get_trial_dir()) / DIVERGED_FILE
    if not path.is_file():
        return
    record = json.loads(path.read_text())
    if record["lr"] == lr and record["grad_clip"] == cfg.optim.grad_clip:
        raise NonFiniteLossError(f"{record['error']} (not retried: the same LR and clipping diverged before)")
    path.unlink()


def epoch_metrics(epoch, tr, val, device, cfg: Config, history, lr: float, tasks) -> dict:
    """The flat per-epoch row Tune records (result.json, progress.csv, TensorBoard)."""
    m = {
        "epoch": epoch,
        "train_loss": tr.loss,
        "val_loss": val.loss,
        "train_acc": tr.accuracy,
        "val_acc": val.accuracy,
        "grad_norm": tr.grad_norm,
        "peak_memory_mb": peak_memory_mb(device),
        "memory_kind": "gpu_allocated" if device.type == "cuda" else "process_rss",
        "epoch_time_s": tr.seconds,
        "lr": tr.lr,
        "lr_peak": lr,
        "score": selection_score(history["train"], history["val"], cfg.sweep.overfit_weight),
    }
    for module, v in val.module_loss.items():
        m[f"val_loss/{module}"] = v
    # A metric's name says what it is: accuracy for a classification task, mean absolute error otherwise.
    short = {t: "acc" if spec.is_classification else "mae" for t, spec in tasks.items()}
    for module, v in val.module_metric.items():
        m[f"val_{short[MODULE_TASK[module]]}/{module}"] = v
    for task, v in val.task_metric.items():
        m[f"val_fused_{short[task]}/{task}"] = v
    for group, members in GROUPS.items():
        m[f"val_group_loss/{group}"] = float(np.mean([val.module_loss[x] for x in members]))
    return m


def memory_metrics(state: TrainingState, tr) -> dict:
    """Per-epoch memory scalars: peak reserved (GPU), moves between GPU and CPU, swap-manager actions."""
    device = state.device
    m = {
        "memory_strategy": state.placement.plan.strategy,
        "moved_gb": sum(x["bytes"] for x in tr.memory_moves) / GiB,
        "move_seconds": sum(x["seconds"] or 0.0 for x in tr.memory_moves),
        "dsm_swaps": sum(x["action"] in ("swap_out", "swap_in") for x in tr.memory_moves),
        "streamed_units": len(state.placement.plan.streamed),
        "skipped_unit_steps": tr.skipped_units,
    }
    if device.type == "cuda":
        # The placement resets the allocator's peak counters at every unit turn; it keeps the epoch's.
        peaks = state.placement.take_peaks()
        m["peak_memory_mb"] = peaks["allocated"] / 2**20
        m["peak_reserved_mb"] = peaks["reserved"] / 2**20
        m["context_mb"] = state.placement.budget.context_bytes / 2**20  # this process's own (NVML or warm-up)
        m["other_processes_mb"] = state.placement.budget.others_bytes / 2**20  # reported, not charged
        m["alloc_retries_total"] = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
    return m


def memory_record(state: TrainingState, budget, moves: list[dict], trace: list[dict]) -> dict:
    """The checkpoint's memory section: the plan in force, the budget, and every move and turn since the last one."""
    plan = state.placement.plan
    return {
        "strategy": plan.strategy,
        "device": plan.device,
        "budget_bytes": budget.bytes,
        "context_bytes": state.placement.budget.context_bytes,  # as measured again after the first step
        "context_source": budget.context_source,
        "other_processes_bytes": state.placement.budget.others_bytes,
        "target": plan.target,
        "resident": list(plan.resident),
        "streamed": list(plan.streamed),
        "plan_peak_bytes": plan.peak_bytes,
        "transfer_bytes_per_step": plan.transfer_bytes_per_step,
        "waited_bytes_per_step": plan.waited_bytes_per_step,
        "moves": moves,
        "trace": trace,
    }


def diverged_row(epoch: int, lr: float, reason: str) -> dict:
    """The sweep's record of an LR whose loss became non-finite: NaN losses, an infinite score."""
    numeric = [c for c in EPOCH_COLUMNS if c not in ("epoch", "lr_peak", "memory_kind")]
    row = dict.fromkeys(numeric, float("nan"))
    return {
        **row,
        "epoch": epoch,
        "lr_peak": lr,
        "memory_kind": "",
        "score": float("inf"),
        "diverged": reason,
    }


def checkpoint_meta(epoch: int, cfg: Config, data: EncodedData, lr: float, device, history) -> dict:
    return {
        "epoch": epoch,
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "config": config_to_dict(cfg),
        "seed": cfg.run.seed,
        "lr_peak": lr,
        "data_fingerprint": data.fingerprint,
        "split": {k: v for k, v in data.split_record().items() if k != "ids"},  # ids: <experiment>/split.json
        "tasks": {t: {"kind": s.kind, "labels": list(s.labels)} for t, s in data.tasks.items()},
        "input_dim": data.input_dim,
        "modules": {m: MODULE_TASK[m] for m in MODULE_TASK},
        "groups": {g: list(ms) for g, ms in GROUPS.items()},
        "package_version": __version__,
        "torch_version": torch.__version__,
        "device": describe_device(device),
        "loss_history": history,
    }


def resume_state(state: TrainingState, epoch: int) -> dict:
    """The checkpoint's resume state: the training state's, and the epoch it ends."""
    return {"epoch": epoch, **state.state_dict()}


def restore(state: TrainingState, directory: Path, cfg: Config, data: EncodedData) -> int:
    """Load weights and resume state from a checkpoint; return its epoch."""
    info = verify_checkpoint(directory)
    if info.meta["data_fingerprint"] != data.fingerprint:
        raise RuntimeError(
            f"{directory}: written for data split {info.meta['data_fingerprint'][:12]}, "
            f"but this run's split is {data.fingerprint[:12]}; resume with the same data settings."
        )
    state.model.load_state_dict(load_model_state(directory), strict=True)
    rs = load_resume_state(directory)
    if "optimizers" not in rs:
        raise CheckpointError(
            f"{directory}: its resume state holds one optimizer for the whole model (written by redheart-tune "
            "before per-unit optimizers); resume it with that version, or start a new run"
        )
    state.load_state_dict(rs)
    return int(rs["epoch"])
