"""Shared fixtures: a capped, session-wide Ray; the smoke config; one data cache for the whole test run."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
# As run.py does (Ray reads it at import, and conftest comes first): Ray's token authentication, so the
# tests' own clusters and the run.py drivers they start agree (a driver and its cluster must).
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One download/encoding cache for every test (the VADER fetch and the encoder run once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture()
def smoke_cfg(tmp_path, data_cache):
    """configs/smoke.yaml writing under a fresh tmp dir, reading the shared cache."""
    from redheart_tune.config import load_config

    def make(*overrides: str):
        return load_config(
            REPO / "configs" / "smoke.yaml",
            [f"run.output_root={tmp_path / 'runs'}", f"data.cache_dir={data_cache}", *overrides],
        )

    return make


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray capped to 2 CPUs and a small object store; always shut down."""
    import ray

    ray.init(
        address="local",  # never a cluster another test (or anything else on the machine) runs
        num_cpus=2,
        object_store_memory=100 * 2**20,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def first_gradients(state):
    """Every parameter's gradient (by name) as its unit's optimizer first steps, captured while inside."""
    grads: dict = {}

    def capture(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and state.param_names[p] not in grads:
                    grads[state.param_names[p]] = p.grad.detach().clone()

    handles = [opt.register_step_pre_hook(capture) for opt in state.optimizers.values()]
    try:
        yield grads
    finally:
        for h in handles:
            h.remove()
