"""What one optimizer step costs a GPU, counted on any machine: calls, launches, host syncs, bytes.

    python -m benchmarks.step_counters                       # tiny and mid, resident and stream
    python -m benchmarks.step_counters --preset redheart-730m --tokens 128   # the spec's structure (slow on a CPU)

A GPU step of this model is bound by how many kernels it launches and how often the
host waits for the device, not by arithmetic.  Both are properties of the code, so
they are counted here on a CPU, per optimizer step of ``batch_size x grad_accum`` rows:

- ``forward`` / ``backward``: ``forward_unit`` calls per unit, and ``backward()`` calls;
- ``ops``: aten operators that would launch a kernel (views, aliases and metadata excluded),
  seen by a ``TorchDispatchMode`` in forward, loss, backward and optimizer step.  On a CPU
  an LSTM/GRU runs as per-time-step aten ops where cuDNN runs one kernel sequence, so
  ``rnn_calls`` (calls of a ``torch.nn`` RNN module) is counted apart: each one is a
  cuDNN call on a GPU;
- ``syncs``: operators that make the host wait for the device: ``nonzero``, ``masked_select``,
  boolean-mask ``index``, ``_local_scalar_dense`` (``.item()``, ``bool(t)``), and any copy
  between devices (on a CPU run the code's own device moves are none, so this is a lower bound).
  Not counted: the input checks on the CPU batches, the RNNs' packing by CPU lengths (and their
  reads of the packed sequence's CPU batch sizes) and the one
  read of the step's numbers at its end (by design).  The optimizer step counts too: fused
  AdamW keeps its step counters on the device and reads nothing back;
- ``optimizer_steps``: ``Optimizer.step`` calls, and ``optimizer_ops`` inside them (fused AdamW:
  one kernel per parameter group, plus the step counters' increment, on a CPU and a GPU alike);
- ``moved_bytes``: bytes the placement moved between host and device (stream strategy).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

aten = torch.ops.aten

SYNC_OPS = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.is_nonzero.default,
}
# Not kernels: allocation, shape and metadata operators (views are found by their schema).
FREE = {
    aten.empty,
    aten.empty_like,
    aten.empty_strided,
    aten.new_empty,
    aten.new_empty_strided,
    aten.set_,
    aten.resize_,
    aten.sym_size,
    aten.sym_stride,
    aten.sym_numel,
    aten.is_same_size,
    aten.lift_fresh,
}


def _is_free(func) -> bool:
    """True for an operator that launches no kernel: allocation, metadata, or a view of its input."""
    if func.overloadpacket in FREE:
        return True
    outs = func._schema.returns
    return bool(outs) and all(r.alias_info is not None and not r.alias_info.is_write for r in outs)


class OpCounter(TorchDispatchMode):
    """Counts kernel-launching aten operators and host-synchronising ones, per phase of the step.

    Phases: "compute" (forward, loss, backward, clipping, the moves), "optimizer"
    (``Optimizer.step``), "host" (work on CPU tensors by design: the input checks on the
    CPU batches, and the one read of the step's numbers at its end).  Syncs count in
    "compute" and "optimizer".
    """

    def __init__(self) -> None:
        super().__init__()
        self.phase = "compute"
        self.cpu_lengths = False  # inside RNN packing: its scalar reads are of the CPU lengths, by design
        self.ops: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not _is_free(func):
            self.ops[self.phase] += 1
            if self.phase == "compute":
                self.by_op[str(func.overloadpacket.__name__)] += 1
        if self.phase == "host" or self.cpu_lengths:
            return out
        name = None
        if func in SYNC_OPS:
            name = str(func.overloadpacket.__name__)
        elif func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())
        ):
            name = f"{func.overloadpacket.__name__}(bool mask)"
        elif func.overloadpacket in (aten._to_copy, aten.copy_):
            devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
            target = kwargs.get("device")
            if target is not None:
                devices.add(torch.device(target).type)
            if len(devices) > 1:
                name = f"{func.overloadpacket.__name__}(cross-device)"
        if name:
            self.syncs[name] += 1
        return out


@dataclass
class StepCounts:
    preset: str
    strategy: str
    rows: int
    tokens: int
    micro_batch: int
    forward: dict[str, int] = field(default_factory=dict)
    backward: int = 0
    ops: int = 0  # forward, loss, backward, clipping
    optimizer_ops: int = 0
    rnn_calls: int = 0
    syncs: dict[str, int] = field(default_factory=dict)
    optimizer_steps: int = 0
    moved_bytes: int = 0
    top_ops: list[tuple[str, int]] = field(default_factory=list)

    @property
    def sync_total(self) -> int:
        return sum(self.syncs.values())

    @property
    def max_forward_per_unit(self) -> int:
        return max(self.forward.values(), default=0)


def count_step(
    preset: str = "tiny",
    *,
    strategy: str = "resident",
    batch: int = 4,
    accum: int = 16,
    tokens: int = 32,
    budget_gb: float = 0.05,
    overrides: tuple[str, ...] = (),
) -> StepCounts:
    """Counts of the second optimizer step of a fresh model on synthetic data (the first warms up)."""
    from benchmarks.synthetic import synthetic_data
    from redheart_tune.config import load_config
    from redheart_tune.engine.loop import build_training
    from redheart_tune.engine.memory import Window, train_step
    from redheart_tune.engine.memory import step as step_module
    from redheart_tune.model.family import RedHeart

    cfg = load_config(
        CONFIGS / "default.yaml",
        [
            f"model.preset={preset}",
            f"optim.batch_size={batch}",
            f"optim.grad_accum={accum}",
            f"data.max_tokens={tokens}",
            "optim.precision=fp32",
            f"memory.strategy={strategy}",
            f"memory.gpu_budget_gb={budget_gb}",
            *overrides,
        ],
    )
    data = synthetic_data(batch * accum * 2, tokens, seed=0)
    state = build_training(cfg, data, 1e-4, 1, torch.device("cpu"))
    from redheart_tune.data import iterate_batches

    batches = iterate_batches(data, "train", batch, shuffle=True, generator=state.generator)
    windows = [[next(batches) for _ in range(accum)] for _ in range(2)]
    train_step(state, Window(1, 1, 0, windows[0]))
    state.placement.drain()

    forward: Counter[str] = Counter()
    counts = {"backward": 0, "opt": 0, "rnn": 0}
    counter = OpCounter()
    original_forward_unit = RedHeart.forward_unit
    original_backward = torch.Tensor.backward
    original_check, original_read = step_module.check_inputs, step_module.read_results
    original_pack = torch.nn.utils.rnn.pack_padded_sequence

    def pack(*args, **kwargs):
        counter.cpu_lengths = True
        try:
            return original_pack(*args, **kwargs)
        finally:
            counter.cpu_lengths = False

    def forward_unit(self, unit, *args, **kwargs):
        forward[unit] += 1
        return original_forward_unit(self, unit, *args, **kwargs)

    def backward(self, *args, **kwargs):
        counts["backward"] += 1
        return original_backward(self, *args, **kwargs)

    def on_host(fn):
        def run(*args, **kwargs):
            counter.phase = "host"
            try:
                return fn(*args, **kwargs)
            finally:
                counter.phase = "compute"

        return run

    def opt_pre(optimizer, args, kwargs):
        counts["opt"] += 1
        counter.phase = "optimizer"

    def opt_post(optimizer, args, kwargs):
        counter.phase = "compute"

    def rnn_in(module, args):  # a packed RNN reads its CPU batch sizes: by design, no device wait
        counts["rnn"] += 1
        counter.cpu_lengths = True

    def rnn_out(module, args, output):
        counter.cpu_lengths = False

    rnns = [m for m in state.model.modules() if isinstance(m, torch.nn.RNNBase)]
    handles = [m.register_forward_pre_hook(rnn_in) for m in rnns]
    handles += [m.register_forward_hook(rnn_out) for m in rnns]
    handles += [register_optimizer_step_pre_hook(opt_pre), register_optimizer_step_post_hook(opt_post)]
    RedHeart.forward_unit = forward_unit
    torch.Tensor.backward = backward
    step_module.check_inputs, step_module.read_results = on_host(original_check), on_host(original_read)
    torch.nn.utils.rnn.pack_padded_sequence = pack
    try:
        with counter:
            train_step(state, Window(1, 2, accum, windows[1]))
    finally:
        RedHeart.forward_unit = original_forward_unit
        torch.Tensor.backward = original_backward
        step_module.check_inputs, step_module.read_results = original_check, original_read
        torch.nn.utils.rnn.pack_padded_sequence = original_pack
        for h in handles:
            h.remove()
    moves, _ = state.placement.drain()
    return StepCounts(
        preset=preset,
        strategy=state.placement.plan.strategy,
        rows=batch * accum,
        tokens=tokens,
        micro_batch=batch * max(u.pass_batches for u in state.placement.plan.units),
        forward=dict(forward),
        backward=counts["backward"],
        ops=counter.ops["compute"],
        optimizer_ops=counter.ops["optimizer"],
        rnn_calls=counts["rnn"],
        syncs=dict(counter.syncs),
        optimizer_steps=counts["opt"],
        moved_bytes=sum(m["bytes"] for m in moves),
        top_ops=counter.by_op.most_common(8),
    )


def format_counts(rows: list[StepCounts]) -> str:
    head = (
        "| preset | strategy | rows x tokens | largest pass (rows) | forward calls / unit (max) | backward calls "
        "| aten ops (fwd+loss+bwd) | RNN calls | host syncs | optimizer.step | optimizer ops | moved (MiB) |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r.preset} | {r.strategy} | {r.rows} x {r.tokens} | {r.micro_batch} | {r.max_forward_per_unit} "
            f"| {r.backward} | {r.ops:,} | {r.rnn_calls} | {r.sync_total} | {r.optimizer_steps} "
            f"| {r.optimizer_ops:,} | {r.moved_bytes / 2**20:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--preset", action="append", help="tiny, mid, redheart-730m (repeatable; default tiny, mid)"
    )
    ap.add_argument("--strategy", action="append", help="resident, stream (repeatable; default both)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--budget-gb", type=float, help="the stream strategy's byte budget (default: per preset)")
    ap.add_argument("--json", action="store_true", help="the rows as JSON")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. optim.micro_batch=4")
    args = ap.parse_args()
    torch.set_num_threads(1)
    budgets = {"tiny": 0.03, "mid": 0.6, "redheart-730m": 8.0}
    rows = []
    for preset in args.preset or ["tiny", "mid"]:
        for strategy in args.strategy or ["resident", "stream"]:
            rows.append(
                count_step(
                    preset,
                    strategy=strategy,
                    batch=args.batch,
                    accum=args.accum,
                    tokens=args.tokens,
                    budget_gb=args.budget_gb or budgets[preset],
                    overrides=tuple(args.overrides),
                )
            )
    if args.json:
        print(json.dumps([{**asdict(r), "sync_total": r.sync_total} for r in rows], indent=2))
        return
    print(format_counts(rows))
    for r in rows:
        if r.syncs:
            print(f"{r.preset}/{r.strategy} host syncs: {r.syncs}")
        print(f"{r.preset}/{r.strategy} most frequent ops: {r.top_ops}")


if __name__ == "__main__":
    main()
