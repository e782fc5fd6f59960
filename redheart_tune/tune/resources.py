"""Ray start-up, GPU detection and the fractional GPU share of a trial.

A trial that asks for a GPU on a GPU-less cluster waits PENDING forever without
an error, so the request is derived from what the cluster really has.
"""

from __future__ import annotations

import logging
import os

import ray
import torch

from redheart_tune.config import Config
from redheart_tune.tune.auth import match_cluster_auth

log = logging.getLogger(__name__)


def start_ray(cfg: Config, *, include_dashboard: bool | None = None):
    """Start (or join) Ray with capped CPUs and object store; a no-op when Ray is already up.  Returns Ray's
    context (its ``dashboard_url``), None when Ray was up already."""
    if ray.is_initialized():
        return None
    # Trials resolve paths themselves; keep their working directory the driver's.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    r = cfg.resources
    address = cluster_address(cfg)
    if address:
        # Joining a cluster: the code travels with the job (runtime_env py_modules), so the workers need
        # only the dependencies installed; paths were resolved in the driver (tune.config.resolve_paths).
        # Its authentication is the cluster's, not run.py's default (redheart_tune/tune/dashboard.py).
        match_cluster_auth(address)
        return ray.init(address=address, log_to_driver=True, runtime_env={"py_modules": code_modules()})
    return ray.init(
        # A Ray of its own, never one that happens to run on this machine: two runs share no state.
        address="local",
        num_cpus=r.ray_num_cpus,
        object_store_memory=r.object_store_mb * 2**20,
        include_dashboard=include_dashboard,
        dashboard_host="127.0.0.1",  # this machine only, never every interface (redheart_tune/tune/dashboard.py)
        configure_logging=True,
        logging_level=logging.WARNING,
    )


def cluster_address(cfg: Config) -> str | None:
    """The cluster to join: ``resources.address``, else ``RAY_ADDRESS``; None starts a Ray of the run's own."""
    return cfg.resources.address or os.environ.get("RAY_ADDRESS") or None


def code_modules() -> list:
    """The project's package, shipped to a cluster's workers with the job (the driver imports it anyway)."""
    import redheart_tune

    return [redheart_tune]


def torch_threads(cpus: float, cores: int | None = None) -> int:
    """torch threads for a trial Ray gave ``cpus`` CPUs: that many, less one when they are every core.

    Ray's own processes and the driver run beside the trial; on a 2-core machine a
    trial with 2 threads ran 1.16x slower than the bare loop, with 1 thread 1.00x
    (benchmarks/tune_overhead.py).
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = int(cpus)
    if threads >= cores:
        threads = cores - 1
    return max(1, threads)


def trial_threads(cfg: Config) -> int:
    """Inside a trial: ``resources.torch_threads``, else ``torch_threads`` of the CPUs Ray assigned it."""
    if cfg.resources.torch_threads:
        return cfg.resources.torch_threads
    return torch_threads(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))


def largest_node_cpus() -> float:
    """The CPUs of the cluster's largest live node."""
    per_node = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return float(max(per_node, default=1.0)) or 1.0


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def trial_resources(cfg: Config) -> dict[str, float]:
    """The per-trial request: a GPU share only when the cluster has a GPU, CPUs capped to what one node has
    (a trial runs on one node: a cluster's total of 16 CPUs over four nodes cannot host an 8-CPU trial)."""
    cpus = min(cfg.resources.cpus_per_trial, largest_node_cpus())
    request = {"cpu": cpus}
    if cluster_gpus() > 0 and cfg.resources.gpu > 0:
        request["gpu"] = cfg.resources.gpu
    return request


def trial_device(gpu_ids: list) -> torch.device:
    """Inside a trial: the GPU Ray assigned it, or the CPU when it was given none.

    A trial that Ray gave a GPU but that torch cannot see stops with an error naming
    both, rather than quietly training on the CPU for days.  The memory budget (the
    GPU share and ``memory.gpu_budget_gb``) is set by ``tune.memory.trial_budget``.
    """
    if not gpu_ids:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"Ray assigned this trial GPU(s) {gpu_ids} (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}), but torch {torch.__version__} sees no CUDA device "
            f"(torch.version.cuda={torch.version.cuda}): install a CUDA build of torch on the workers, or set "
            "resources.gpu=0 to train on the CPU"
        )
    return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned card


def describe_device(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory_gb": round(props.total_memory / 2**30, 2)}
    return {"type": "cpu", "name": "cpu", "threads": torch.get_num_threads()}
