"""The LR sweep on a two-node Ray cluster: five trials at once against one after another, in one run.

    python -m benchmarks.cluster_sweep [--config configs/smoke.yaml] [--cpus 3] [key=value ...]

Starts a head and a worker node on this machine (``ray.cluster_utils.Cluster``, ``--cpus`` CPUs
each), then runs ``run.py sweep`` twice against it through ``resources.address``, in fresh output
roots: ``sweep.max_concurrent=1`` (the spec's sequential sweep) and ``sweep.max_concurrent=5``.
Prints each wall-clock time (driver start to finish; the data is encoded before either), the ratio,
and which node ran each trial.  Both nodes share this machine's cores, so the ratio says what the scheduling
gains here, not what five machines would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LRS = "[1.0e-4,2.0e-4,5.0e-4,1.0e-3,2.0e-3]"


def sweep(address: str, root: Path, config: str, concurrent: int, extra: list[str]) -> tuple[float, Counter]:
    cmd = [
        sys.executable,
        str(REPO / "run.py"),
        "sweep",
        config,
        f"run.output_root={root}",
        f"resources.address={address}",
        "resources.cpus_per_trial=1",
        f"sweep.lrs={LRS}",
        f"sweep.max_concurrent={concurrent}",
        *extra,
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"sweep failed ({concurrent} at once):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    nodes: Counter = Counter()
    for result in root.glob("*/sweep/*/result.json"):
        first = json.loads(result.read_text().splitlines()[0])
        nodes[first["node_id"][:8]] += 1
    return seconds, nodes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "smoke.yaml"))
    ap.add_argument("--cpus", type=int, default=3, help="CPUs each node offers Ray")
    ap.add_argument("overrides", nargs="*", help="key=value for both sweeps (e.g. data.cache_dir=...)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # as run.py: a cluster and its drivers must agree
    from redheart_tune.config import cache_dir, load_config
    from redheart_tune.data import prepare_data

    cfg = load_config(args.config, args.overrides)
    prepare_data(cfg.data, cache_dir(cfg), show_progress=True)  # encoded once, before either timing
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": args.cpus,
            "object_store_memory": 200 * 2**20,
            "include_dashboard": False,
        },
    )
    cluster.add_node(num_cpus=args.cpus, object_store_memory=200 * 2**20)
    cluster.wait_for_nodes()
    try:
        with tempfile.TemporaryDirectory(prefix="cluster-sweep-") as tmp:
            print(
                f"two nodes x {args.cpus} CPUs on this machine ({os.cpu_count()} cores), cluster {cluster.address}"
            )
            seq, seq_nodes = sweep(cluster.address, Path(tmp) / "seq", args.config, 1, args.overrides)
            print(f"one after another: {seq:.1f} s; trials per node {dict(seq_nodes)}")
            par, par_nodes = sweep(cluster.address, Path(tmp) / "par", args.config, 5, args.overrides)
            print(f"five at once:      {par:.1f} s; trials per node {dict(par_nodes)}")
            print(
                f"wall-clock ratio five-at-once / one-after-another: {par / seq:.2f} ({seq / par:.2f}x faster)"
            )
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
