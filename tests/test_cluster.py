"""A two-node Ray cluster on this machine, writing to a real S3-compatible server on 127.0.0.1.

The smoke sweep runs its five LRs at once across both nodes (sweep.max_concurrent=5), the code shipped
to the workers with the job and the data through the object store; training writes its checkpoints to
the bucket; analyze, crossover and report then run from the storage URI alone, with an empty local
mirror, and put their outputs in the bucket.  No mocks inside any process: moto's server is an
S3-compatible HTTP server, reached over loopback by pyarrow, as Ray reaches any bucket.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pyarrow.fs as pafs
import pytest

from tests.conftest import REPO
from tests.test_cli import run_py

pytestmark = pytest.mark.slow

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
LRS = "[1.0e-4,2.0e-4,5.0e-4,1.0e-3,2.0e-3]"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port; the run's root URI in a fresh bucket."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    os.environ.update(S3_ENV)  # the nodes started below, and run.py, inherit the credentials
    uri = f"s3://redheart/runs?endpoint_override=127.0.0.1:{port}&scheme=http"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        fs, _ = pafs.FileSystem.from_uri(uri + "&allow_bucket_creation=true")
        fs.create_dir("redheart")
        yield uri, fs
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, three CPUs each: a head and a worker with their own raylets."""
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 3, "object_store_memory": 150 * 2**20, "include_dashboard": False},
    )
    c.add_node(num_cpus=3, object_store_memory=150 * 2**20)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture()
def open_cluster(monkeypatch):
    """Two nodes of one CPU each, started as a user's script starts them: without RAY_AUTH_MODE, so
    without token authentication (conftest asks for it, for the other clusters)."""
    from ray.cluster_utils import Cluster

    with monkeypatch.context() as env:
        env.delenv("RAY_AUTH_MODE", raising=False)  # the nodes' processes inherit this environment
        c = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "object_store_memory": 100 * 2**20, "include_dashboard": False},
        )
        c.add_node(num_cpus=1, object_store_memory=100 * 2**20)
        c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()


def test_sweep_across_two_nodes_into_a_shared_local_path(open_cluster, tmp_path, data_cache):
    """A local output root both nodes reach, on a cluster without tokens.  run.py's driver asked Ray for
    tokens regardless (RAY_AUTH_MODE=token, here from conftest); the workers, without them, could not
    call it back, and Ray cancelled every trial's actor before it ran ("The actor never ran").  The
    driver now takes the cluster's mode."""
    root = tmp_path / "runs"
    sweep = run_py(
        "sweep",
        str(REPO / "configs" / "smoke.yaml"),
        f"run.output_root={root}",
        f"data.cache_dir={data_cache}",
        f"resources.address={open_cluster.address}",
        "resources.cpus_per_trial=1",
        "sweep.lrs=[1.0e-4,1.0e-3]",
        "sweep.max_concurrent=2",
    )
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    assert "runs with RAY_AUTH_MODE=disabled; joining it so (RAY_AUTH_MODE=token here)" in sweep.stderr
    results = sorted((root / "smoke" / "sweep").glob("lr_*/result.json"))
    assert len(results) == 2, results
    nodes = set()
    for f in results:
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        nodes |= {r["node_id"] for r in rows}
    assert len(nodes) == 2, f"both trials ran on one node: {nodes}"
    assert (root / "smoke" / "lr_sweep" / "best_lr.json").is_file()


def _objects(fs: pafs.FileSystem, prefix: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return [i.path for i in infos if i.type == pafs.FileType.File]


def test_sweep_across_two_nodes_then_analysis_from_the_bucket_alone(s3, cluster, tmp_path, data_cache):
    uri, fs = s3
    common = [
        str(REPO / "configs" / "smoke.yaml"),
        f"run.output_root={uri}",
        f"data.cache_dir={data_cache}",
        f"resources.address={cluster.address}",
        "resources.cpus_per_trial=1",
    ]
    sweep = run_py(
        "sweep", *common, f"run.local_dir={tmp_path / 'driver'}", f"sweep.lrs={LRS}", "sweep.max_concurrent=5"
    )
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]

    # Five trials, run at once, on both nodes; their records are in the bucket.
    results = _objects(fs, "redheart/runs/smoke/sweep")
    trials = sorted({p.split("/")[4] for p in results if p.endswith("result.json")})
    assert len(trials) == 5, trials
    nodes = set()
    for t in trials:
        with fs.open_input_stream(f"redheart/runs/smoke/sweep/{t}/result.json") as f:
            rows = [json.loads(line) for line in f.readall().decode().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        nodes |= {r["node_id"] for r in rows}
    assert len(nodes) == 2, f"every trial ran on one node: {nodes}"
    assert "redheart/runs/smoke/lr_sweep/best_lr.json" in _objects(fs, "redheart/runs/smoke/lr_sweep")

    train = run_py("train", *common, f"run.local_dir={tmp_path / 'driver'}", "train.epochs=4")
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    checkpoints = [p for p in _objects(fs, "redheart/runs/smoke/train") if p.endswith("group_b.safetensors")]
    assert len(checkpoints) == 2  # epochs 2 and 4, in the bucket
    # The driver pruned the older checkpoint's resume state on the bucket itself.
    states = [p for p in _objects(fs, "redheart/runs/smoke/train") if p.endswith("resume_state.pt")]
    assert len(states) == 1 and "checkpoint_000001" in states[0]

    # Analysis from the URI alone: another machine, an empty mirror, nothing but the bucket.
    elsewhere = [
        str(REPO / "configs" / "smoke.yaml"),
        f"run.output_root={uri}",
        f"run.local_dir={tmp_path / 'elsewhere'}",
        f"data.cache_dir={data_cache}",
    ]
    for command in ("analyze", "crossover", "report"):
        done = run_py(command, *elsewhere)
        assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-3000:])
    stored = set(_objects(fs, "redheart/runs/smoke"))
    for f in ("analysis/sweet_spots.json", "analysis/results.csv", "final/crossover.safetensors"):
        assert f"redheart/runs/smoke/{f}" in stored, f
    with fs.open_input_stream("redheart/runs/smoke/analysis/results.csv") as f:
        results = pd.read_csv(f)
    assert len(results) == 2 * 10 and set(results["split"]) == {"test", "holdout"}
    status = run_py("status", *elsewhere)
    assert status.returncode == 0 and "epoch 4/4 (100 %)" in status.stdout, status.stdout + status.stderr
