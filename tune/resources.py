"""Ray start-up, GPU detection and the fractional GPU share of a trial.

A trial that asks for a GPU on a GPU-less cluster waits PENDING forever without
an error, so the request is derived from what the cluster really has.
"""

from __future__ import annotations

import logging
import os

import ray
import torch

from tune.config import Config

log = logging.getLogger(__name__)


def start_ray(cfg: Config, *, include_dashboard: bool | None = None) -> None:
    """Start (or join) Ray with capped CPUs and object store; a no-op when Ray is already up."""
    if ray.is_initialized():
        return
    # Trials resolve paths themselves; keep their working directory the driver's.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    r = cfg.resources
    if r.address:
        ray.init(address=r.address, log_to_driver=True)
        return
    ray.init(
        num_cpus=r.ray_num_cpus,
        object_store_memory=r.object_store_mb * 2**20,
        include_dashboard=include_dashboard,
        configure_logging=True,
        logging_level=logging.WARNING,
    )


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def trial_resources(cfg: Config) -> dict[str, float]:
    """The per-trial request: a GPU share only when the cluster has a GPU, CPUs capped to what exists."""
    cpus = min(cfg.resources.cpus_per_trial, float(ray.cluster_resources().get("CPU", 1.0)))
    request = {"cpu": cpus}
    if cluster_gpus() > 0 and cfg.resources.gpu > 0:
        request["gpu"] = cfg.resources.gpu
    return request


def trial_device(gpu_share: float) -> torch.device:
    """Inside a trial: the device Ray gave it, with the GPU share enforced as a memory fraction."""
    if gpu_share > 0 and torch.cuda.is_available():
        device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned card
        torch.cuda.set_per_process_memory_fraction(min(gpu_share, 1.0), device)
        torch.cuda.reset_peak_memory_stats(device)
        return device
    return torch.device("cpu")


def describe_device(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory_gb": round(props.total_memory / 2**30, 2)}
    return {"type": "cpu", "name": "cpu", "threads": torch.get_num_threads()}
