"""One trial-like process of tests/test_memory_cuda.py::test_two_processes_share_the_card (not a test).

    python tests/cuda_share_worker.py BARRIER_DIR NAME PEERS MARGIN_MIB TENSORS_MIB OVERRIDE...

It takes a 0.5 share of cuda:0 the way a trial does (``trial_budget``), with a budget of its
warmed-up context + MARGIN_MIB + TENSORS_MIB (over memory.target), builds the mid model
streamed, waits until all PEERS processes have built theirs (so every one's memory is on the
card before anyone steps), runs 4 optimizer steps, waits until all have stepped (so each one's
last measure sees the others) and prints one line ``RESULT {json}``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.synthetic import synthetic_data  # noqa: E402
from redheart_tune.config import load_config  # noqa: E402
from redheart_tune.data import iterate_batches  # noqa: E402
from redheart_tune.engine.loop import build_training  # noqa: E402
from redheart_tune.engine.memory import GiB, Window, configure_allocator, train_step, trial_budget  # noqa: E402
from redheart_tune.engine.memory.budget import process_memory  # noqa: E402

DEVICE = torch.device("cuda", 0)
MiB = 2**20


def wait_for_peers(folder: Path, name: str, peers: int, timeout_s: float = 180) -> None:
    """Mark this process as arrived in ``folder`` and wait until all ``peers`` have."""
    folder.mkdir(exist_ok=True)
    (folder / name).touch()
    deadline = time.monotonic() + timeout_s
    while len(list(folder.iterdir())) < peers:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{name}: the other processes did not reach {folder.name} within {timeout_s} s"
            )
        time.sleep(0.05)


def main(barrier: str, name: str, peers: int, margin_mib: int, tensors_mib: int, *overrides: str) -> None:
    configure_allocator()  # before the first CUDA allocation

    def cfg(*more: str):
        return load_config(REPO / "configs" / "smoke.yaml", [*overrides, *more])

    probe = trial_budget(cfg(), DEVICE, 0.5)  # the warmed-up context of this process
    gb = (probe.context_bytes + (margin_mib + tensors_mib) * MiB) / cfg().memory.target / GiB
    c = cfg("model.preset=mid", "memory.strategy=stream", f"memory.gpu_budget_gb={gb:.6f}")
    budget = trial_budget(c, DEVICE, 0.5)
    planned = dataclasses.replace(budget, context_bytes=budget.context_bytes + margin_mib * MiB)
    data = synthetic_data(96, 32)  # 12 batches of 8: 4 steps of 2
    state = build_training(c, data, 1e-3, 1, DEVICE, budget=planned)

    wait_for_peers(Path(barrier, "built"), name, peers)

    torch.cuda.reset_peak_memory_stats(DEVICE)
    batches = iterate_batches(data, "train", 8, shuffle=True, generator=torch.Generator().manual_seed(7))
    for k in range(4):
        train_step(state, Window(1, k + 1, 2 * k, [next(batches), next(batches)]))
        state.schedule.step()
    state.placement.synchronize()
    peaks = state.placement.take_peaks()
    mem, reserved = process_memory(DEVICE), torch.cuda.memory_reserved(DEVICE)  # the others are still on
    wait_for_peers(Path(barrier, "stepped"), name, peers)  # the card until all have stepped
    after = state.placement.budget
    result = {
        "name": name,
        "budget": budget.bytes,
        "source": budget.source,
        "context_source": budget.context_source,
        "context_measured": budget.context_bytes,
        "context_planned": planned.context_bytes,
        "context_after": after.context_bytes,
        "others_after": after.others_bytes,
        "peak_reserved": peaks["reserved"],
        "own_nvml_end": None if mem is None else mem.own,
        "others_nvml_end": None if mem is None else sum(mem.others.values()),
        "context_nvml_end": None if mem is None else mem.own - reserved,
        "streamed": list(state.placement.plan.streamed),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), *a[5:])
