"""Per-process GPU accounting on a shared card, on a CPU: the device's counters are faked.

Issue 17: two trials sharing a card (``resources.gpu=0.5``) each counted the other's memory
as their own CUDA context, because the context was the card's used memory (``mem_get_info``)
less the process's own allocator.  A trial's context and use are now its own process's
(NVML's per-process figure, or a context measured once after a warm-up), so memory of
another process appearing on the card, before or during the run, moves neither the
trial's budget, nor its context, nor its allocator cap.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

from redheart_tune.config import MemoryConfig
from redheart_tune.engine.memory import budget as bm
from redheart_tune.engine.memory.sizes import GiB

MiB = 2**20
CARD = 140 * GiB
CUDA = torch.device("cuda", 0)  # only a name: nothing here touches CUDA
ME, OTHER = os.getpid(), os.getpid() + 1000


class FakeCard:
    """The counters of one card shared by this process and others: the allocator's reserved bytes,
    this process's context, and other processes' bytes; records every allocator cap set."""

    def __init__(self, *, context: int, reserved: int = 0, nvml: bool = True) -> None:
        self.context, self.reserved, self.others, self.nvml = context, reserved, {}, nvml
        self.fractions: list[float] = []
        self.warm_ups = 0

    def used(self) -> int:
        return self.context + self.reserved + sum(self.others.values())

    def install(self, monkeypatch) -> FakeCard:
        monkeypatch.setattr(bm, "warm_up", lambda device: setattr(self, "warm_ups", self.warm_ups + 1))
        monkeypatch.setattr(bm, "card_memory", lambda device: (CARD - self.used(), CARD))
        monkeypatch.setattr(bm, "allocator_reserved", lambda device: self.reserved)
        monkeypatch.setattr(bm, "device_name", lambda device: "Fake H200")
        monkeypatch.setattr(bm, "set_allocator_fraction", lambda f, device: self.fractions.append(f))
        monkeypatch.setattr(bm, "reset_peaks", lambda device: None)
        monkeypatch.setattr(
            bm,
            "process_memory",
            lambda device: (
                bm.ProcessMemory(own=self.context + self.reserved, others=dict(self.others))
                if self.nvml
                else None
            ),
        )
        return self


def mem(**kw) -> MemoryConfig:
    return MemoryConfig(**kw)


@pytest.mark.parametrize("others", [1, 3], ids=["two-trials", "four-trials"])
@pytest.mark.parametrize("nvml", [True, False], ids=["nvml", "no-nvml"])
def test_another_process_appearing_moves_neither_budget_nor_context(monkeypatch, nvml, others):
    card = FakeCard(context=900 * MiB, nvml=nvml).install(monkeypatch)
    budget = bm.cuda_budget(mem(gpu_budget_gb=8.0), CUDA, 0.5)
    assert card.warm_ups == 1  # the context is measured after the warm-up
    assert budget.bytes == 8 * GiB and budget.source == "memory.gpu_budget_gb"
    assert budget.context_bytes == 900 * MiB
    assert budget.context_source == ("nvml" if nvml else "warm-up")
    assert card.fractions == [pytest.approx((8 * GiB - 900 * MiB) / CARD)]

    # mid-run: the trial's allocator holds 5 GiB and the other trials' 7.2 GiB each appear on the card
    card.reserved = 5 * GiB
    for i in range(others):
        card.others[OTHER + i] = int(7.2 * GiB)
    after = bm.refresh_context(budget, CUDA)
    assert after.bytes == budget.bytes
    assert after.context_bytes == 900 * MiB
    assert len(card.fractions) == 1  # the cap was not lowered
    if nvml:
        assert after.others_bytes == others * int(7.2 * GiB)  # reported, not charged


def test_the_context_follows_this_process_only(monkeypatch):
    """With NVML, growth of this process's own context after the first step lowers the cap; another
    process's growth at the same time does not."""
    card = FakeCard(context=600 * MiB).install(monkeypatch)
    budget = bm.cuda_budget(mem(gpu_budget_gb=4.0), CUDA, 1.0)
    card.reserved, card.context, card.others[OTHER] = 2 * GiB, 700 * MiB, 3 * GiB
    after = bm.refresh_context(budget, CUDA)
    assert after.context_bytes == 700 * MiB
    assert card.fractions[-1] == pytest.approx((4 * GiB - 700 * MiB) / CARD)
    assert card.fractions[-1] == pytest.approx(bm.allocator_fraction(after))


def test_a_second_trial_starting_on_a_busy_card(monkeypatch):
    """The evidence's failure: the second trial starts while the first holds 7.2 GiB.  Its context is
    its own 0.9 GiB (not 8.1 GiB), and its cap is its own budget less that context."""
    card = FakeCard(context=900 * MiB).install(monkeypatch)
    card.others[OTHER] = int(7.2 * GiB)
    budget = bm.cuda_budget(mem(gpu_budget_gb=8.0), CUDA, 0.5)
    assert budget.context_bytes == 900 * MiB
    assert budget.others_bytes == int(7.2 * GiB)
    assert card.fractions == [pytest.approx((8 * GiB - 900 * MiB) / CARD)]


def test_without_nvml_a_busy_card_is_not_taken_for_a_context(monkeypatch):
    """Without per-process figures, use outside the allocator larger than any context is other
    processes': memory.context_gb is counted instead, and the cap comes from the trial's own budget."""
    card = FakeCard(context=900 * MiB, nvml=False).install(monkeypatch)
    card.others[OTHER] = int(7.2 * GiB)
    budget = bm.cuda_budget(mem(gpu_budget_gb=8.0, context_gb=0.5), CUDA, 0.5)
    assert budget.context_bytes == GiB // 2 and budget.context_source == "config"
    assert card.fractions == [pytest.approx((8 * GiB - GiB // 2) / CARD)]
    assert bm.refresh_context(budget, CUDA) == budget


def test_the_share_sets_the_budget_when_smaller(monkeypatch):
    card = FakeCard(context=500 * MiB).install(monkeypatch)
    budget = bm.cuda_budget(mem(gpu_budget_gb=100.0), CUDA, 0.25)
    assert budget.source == "GPU share" and budget.bytes == int(0.25 * CARD)
    assert card.fractions == [pytest.approx((0.25 * CARD - 500 * MiB) / CARD)]


def test_trial_budget_on_cuda_goes_through_the_per_process_measure(monkeypatch):
    from redheart_tune.config import load_config
    from redheart_tune.engine.memory import trial_budget
    from tests.conftest import REPO

    card = FakeCard(context=900 * MiB).install(monkeypatch)
    card.others[OTHER] = 5 * GiB
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["memory.gpu_budget_gb=2.0"])
    budget = trial_budget(cfg, CUDA, cfg.resources.gpu)
    assert (budget.bytes, budget.context_bytes) == (2 * GiB, 900 * MiB)
    assert card.fractions == [pytest.approx(bm.allocator_fraction(budget))]


def _fake_pynvml(procs, *, fail: bool = False):
    def running(handle):
        if fail:
            raise RuntimeError("NVML: not supported")
        return [types.SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in procs]

    return types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda index: ("handle", index),
        nvmlDeviceGetComputeRunningProcesses=running,
    )


@pytest.fixture
def fake_nvml(monkeypatch):
    """Installs a fake ``pynvml`` module; the lazily imported, cached NVML is cleared around the test."""

    def install(module):
        monkeypatch.setitem(__import__("sys").modules, "pynvml", module)
        bm._nvml.cache_clear()

    yield install
    bm._nvml.cache_clear()


def test_nvml_reading_matches_this_pid(fake_nvml):
    fake_nvml(_fake_pynvml([(OTHER, 7 * GiB), (ME, 900 * MiB), (OTHER + 1, GiB)]))
    got = bm.process_memory(CUDA)
    assert got == bm.ProcessMemory(own=900 * MiB, others={OTHER: 7 * GiB, OTHER + 1: GiB})


@pytest.mark.parametrize(
    ("procs", "fail"),
    [
        ([(OTHER, 7 * GiB)], False),  # this process not seen (another PID namespace)
        ([(ME, None), (OTHER, GiB)], False),  # no per-process figure for it
        ([(ME, bm.NVML_NOT_AVAILABLE)], False),
        ([(ME, GiB)], True),  # the query itself fails
    ],
    ids=["pid-unseen", "none", "not-available", "query-fails"],
)
def test_nvml_falls_back_when_it_cannot_say(fake_nvml, procs, fail):
    fake_nvml(_fake_pynvml(procs, fail=fail))
    assert bm.process_memory(CUDA) is None


def test_without_pynvml_process_memory_is_none(fake_nvml):
    fake_nvml(None)  # sys.modules["pynvml"] = None: importing it raises ImportError
    assert bm.process_memory(CUDA) is None
