"""Memory strategies for redheart-730m under an 8 GiB cap, measured in one run: one table, one row each.

    python -m benchmarks.memory_gpu                      # the issue's table on a GPU (about 6 minutes on an H100)
    python -m benchmarks.memory_gpu --steps 4 --accum 4  # a shorter look
    python -m benchmarks.memory_gpu --device cpu --preset tiny --budget-gb 0.022 --tokens 24   # the code path on a CPU

Rows, each in a process of its own, so a memory cap or the allocator's cache never carries over:

    resident      everything on the GPU, no cap: the reference (it needs 11+ GiB)
    stream        memory.strategy=stream under the budget (redheart_tune/engine/memory: units outer, micro-batches inner)
    cpu_offload   torchao's CPUOffloadOptimizer (AdamW on the CPU, weights and gradients on the GPU)
                  under the budget; it cannot clip gradients, so that row runs unclipped
    stream_compiled   stream with optim.compile=true (each unit's forward under torch.compile); on request
                  (--rows stream,stream_compiled): its first step compiles every unit, so give it --timeout

Columns: peak reserved + CUDA context (what must fit the card), peak allocated, median
optimizer-step time (steps 2..N, synchronised), bytes moved between CPU and GPU per step
(counted by the placement; for cpu_offload its gradients out and weights in, by construction),
the training loss of the last step, and the allocator's retries (near-OOM thrashing).
Targets (issue 8): stream peak reserved <= the budget, step time <= 1.25x resident, and its
loss equal to resident's within bf16 tolerance.  Same seed, same synthetic batches in every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
ROWS = ("resident", "stream", "cpu_offload")
ALL_ROWS = (*ROWS, "stream_compiled")
GiB = 2**30


def _config(args, strategy: str, budget_gb: float, compiled: bool = False):
    from redheart_tune.config import load_config

    return load_config(
        REPO / "configs" / "redheart-730m.yaml",
        [
            f"model.preset={args.preset}",
            f"optim.batch_size={args.batch}",
            f"optim.grad_accum={args.accum}",
            f"data.max_tokens={args.tokens}",
            f"optim.precision={'bf16' if args.device == 'cuda' else 'fp32'}",
            "optim.lr=1e-4",
            f"memory.strategy={strategy}",
            f"memory.gpu_budget_gb={budget_gb}",
            f"optim.compile={str(compiled).lower()}",
        ],
    )


def _windows(data, args, generator):
    from redheart_tune.data import iterate_batches

    batches = iterate_batches(data, "train", args.batch, shuffle=True, generator=generator)
    for _ in range(len(data.splits["train"]) // (args.batch * args.accum)):
        yield [next(batches) for _ in range(args.accum)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device: torch.device, budget, peaks: dict | None = None) -> dict:
    """Peak reserved (+ the context) and allocated over the row.  ``peaks``: a placement's own record
    (it resets the allocator's counters at every unit turn); else the allocator's since the start."""
    if device.type != "cuda":
        return {}
    if peaks is None:
        peaks = {
            "allocated": torch.cuda.max_memory_allocated(device),
            "reserved": torch.cuda.max_memory_reserved(device),
        }
    return {
        "peak_reserved_gib": (peaks["reserved"] + budget.context_bytes) / GiB,
        "peak_allocated_gib": peaks["allocated"] / GiB,
        "context_gib": budget.context_bytes / GiB,
        "alloc_retries": torch.cuda.memory_stats(device).get("num_alloc_retries", 0),
    }


def row_placement(args, strategy: str, compiled: bool = False) -> dict:
    """resident or stream: the project's own training step (engine.memory.train_step), eager or compiled."""
    row = f"{strategy}_compiled" if compiled else strategy
    from benchmarks.synthetic import synthetic_data
    from redheart_tune.engine.loop import build_training
    from redheart_tune.engine.memory import Window, total_of, train_step, trial_budget

    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cuda":
        torch.empty(1, device=device)
        card = torch.cuda.get_device_properties(device).total_memory / GiB
        budget_gb = card if strategy == "resident" else args.budget_gb
    else:
        budget_gb = args.budget_gb
    cfg = _config(args, strategy, budget_gb, compiled)
    data = synthetic_data(args.batch * args.accum * (args.steps + 1), args.tokens, seed=0)
    budget = trial_budget(cfg, device, 1.0)
    t0 = time.perf_counter()
    state = build_training(cfg, data, cfg.optim.lr, 1, device, budget=budget)
    build_s = time.perf_counter() - t0
    times, moved, loss, last_moves = [], [], float("nan"), []
    windows = list(_windows(data, args, state.generator))
    try:
        for k, window in enumerate(windows[: args.steps]):
            _sync(device)
            t = time.perf_counter()
            result = train_step(state, Window(1, k + 1, k * args.accum, window))
            state.schedule.step()
            _sync(device)
            times.append(time.perf_counter() - t)
            moves, _ = state.placement.drain()
            moved.append(sum(m["bytes"] for m in moves))
            last_moves = moves
            loss = float(total_of(result, state.loss_weights).mean())
    except torch.OutOfMemoryError as exc:
        return {
            "row": row,
            "error": f"out of memory after {len(times)} steps: {str(exc).splitlines()[0]}",
            "build_s": build_s,
            **_memory(device, state.placement.budget, state.placement.take_peaks()),
        }
    if args.profile is not None:  # one more step, profiled and not timed (the profiler slows it many times)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            train_step(state, Window(1, args.steps + 1, args.steps * args.accum, windows[args.steps]))
            _sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        Path(args.profile).write_text(
            f"{row}\n{averages.table(sort_by=key, row_limit=40)}\n\nby CPU time\n"
            f"{averages.table(sort_by='self_cpu_time_total', row_limit=40)}\n"
        )
    plan = state.placement.plan
    return {
        "row": row,
        "budget_gib": budget.bytes / GiB,
        "plan": f"{plan.strategy}; streamed: {', '.join(plan.streamed) or 'none'}",
        "plan_peak_gib": (plan.peak_bytes + plan.context_bytes) / GiB,
        "step_s": statistics.median(times[1:] or times),
        "first_step_s": times[0],
        "moved_gib_per_step": statistics.median(moved[1:] or moved) / GiB,
        # where a streamed step's time goes: each kind of move's bytes, copy time and rate, last step
        "moves": move_summary(last_moves),
        "homes_pinned": all(s.home is None or s.home.is_pinned() for s in state.placement.slots.values()),
        "loss": loss,
        "build_s": build_s,
        **_memory(device, state.placement.budget, state.placement.take_peaks()),
    }


def move_summary(moves: list[dict]) -> str:
    """One step's moves by kind: "stream_in 3.10 GiB in 0.150 s (22.2 GB/s, 4 copies); ...".  The
    seconds are the copies' own (CUDA events on the side streams): a step far longer than their sum
    is not waiting on the link."""
    kinds: dict[str, list[float]] = {}
    for m in moves:
        k = kinds.setdefault(m["action"], [0, 0.0, 0])
        k[0] += m["bytes"]
        k[1] += m["seconds"] or 0.0
        k[2] += 1
    return "; ".join(
        f"{action} {b / GiB:.2f} GiB in {s:.3f} s ({b / s / 1e9 if s else float('nan'):.1f} GB/s, {n} copies)"
        for action, (b, s, n) in sorted(kinds.items())
    ) or "none"


def row_cpu_offload(args) -> dict:
    """torchao's CPUOffloadOptimizer: a plain loop, micro-batches outer, the optimizer on the CPU."""
    if args.device != "cuda":
        return {"row": "cpu_offload", "error": "CUDA only (torchao's CPUOffloadOptimizer)"}
    try:
        from torchao.optim import CPUOffloadOptimizer
    except ImportError as exc:
        return {"row": "cpu_offload", "error": f"torchao not installed ({exc}); pip install torchao"}
    from benchmarks.synthetic import synthetic_data
    from redheart_tune.engine.loop import seed_everything
    from redheart_tune.engine.memory import trial_budget
    from redheart_tune.model.family import build_model
    from redheart_tune.model.losses import module_losses, total_loss

    device = torch.device("cuda", 0)
    cfg = _config(args, "stream", args.budget_gb)
    data = synthetic_data(args.batch * args.accum * args.steps, args.tokens, seed=0)
    budget = trial_budget(cfg, device, 1.0)  # the cap, as for the stream row
    seed_everything(0)
    t0 = time.perf_counter()
    model = build_model(cfg.model, data.tasks, data.input_dim).to(device).train()
    params = list(model.parameters())
    opt = CPUOffloadOptimizer(params, torch.optim.AdamW, fused=True, lr=cfg.optim.lr, weight_decay=0.01)
    build_s = time.perf_counter() - t0
    weights = dict(cfg.optim.task_weights)
    times, loss = [], float("nan")
    try:
        for window in _windows(data, args, torch.Generator().manual_seed(0)):
            _sync(device)
            t = time.perf_counter()
            losses = []
            for batch in window:
                batch = batch.to(device, non_blocking=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(batch.tokens, batch.mask, batch.pooled)
                step_loss = total_loss(
                    module_losses(
                        {k: v.float() for k, v in out.items()}, batch.targets, batch.target_mask, data.tasks
                    ),
                    weights,
                )
                (step_loss / len(window)).backward()
                losses.append(step_loss.detach())
            opt.step()
            opt.zero_grad()
            _sync(device)
            times.append(time.perf_counter() - t)
            loss = float(torch.stack(losses).mean())
    except torch.OutOfMemoryError as exc:
        return {
            "row": "cpu_offload",
            "error": f"out of memory under the cap after {len(times)} steps: {str(exc).splitlines()[0]}",
            "build_s": build_s,
            **_memory(device, budget),
        }
    numel = sum(p.numel() for p in params)
    return {
        "row": "cpu_offload",
        "budget_gib": budget.bytes / GiB,
        "plan": "torchao CPUOffloadOptimizer, no clipping",
        "step_s": statistics.median(times[1:] or times),
        "first_step_s": times[0],
        "moved_gib_per_step": 8 * numel / GiB,  # gradients out, weights in, fp32
        "loss": loss,
        "build_s": build_s,
        **_memory(device, budget),
    }


def run_row(args) -> dict:
    from redheart_tune.engine.memory import configure_allocator

    configure_allocator()  # before the first CUDA allocation of this process
    torch.manual_seed(0)
    if args.row == "cpu_offload":
        return row_cpu_offload(args)
    if args.row == "stream_compiled":
        return row_placement(args, "stream", compiled=True)
    return row_placement(args, args.row)


def _fmt(r: dict, key: str, spec: str) -> str:
    v = r.get(key)
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = (
        "| row | plan | peak reserved + context (GiB) | peak allocated (GiB) | set-up (s) | first step (s) "
        "| step (s) | moved/step (GiB) | loss | retries |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['row']} | {r['error']} | {_fmt(r, 'peak_reserved_gib', '.2f')} "
                f"| {_fmt(r, 'peak_allocated_gib', '.2f')} | {_fmt(r, 'build_s', '.1f')} | | | | | |"
            )
            continue
        lines.append(
            f"| {r['row']} | {r['plan']} | {_fmt(r, 'peak_reserved_gib', '.2f')} | {_fmt(r, 'peak_allocated_gib', '.2f')} "
            f"| {_fmt(r, 'build_s', '.1f')} | {r['first_step_s']:.2f} "
            f"| {r['step_s']:.3f} | {r['moved_gib_per_step']:.2f} | {r['loss']:.5f} | {_fmt(r, 'alloc_retries', 'd')} |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict], budget_gb: float, device: str) -> list[str]:
    by = {r["row"]: r for r in rows if "error" not in r}
    out = (
        []
        if device == "cuda"
        else ["on a CPU: the moves are memory copies and nothing is capped; the targets are a GPU's"]
    )
    if "resident" in by and "stream" in by:
        res, st = by["resident"], by["stream"]
        ratio = st["step_s"] / res["step_s"]
        out.append(
            f"stream / resident step time: {ratio:.2f}x (target <= 1.25x): {'met' if ratio <= 1.25 else 'MISSED'}"
        )
        rel = abs(st["loss"] - res["loss"]) / max(abs(res["loss"]), 1e-12)
        out.append(
            f"loss after the last step: stream {st['loss']:.5f}, resident {res['loss']:.5f}, relative difference {rel:.2e}"
        )
        if "peak_reserved_gib" in st:
            ok = st["peak_reserved_gib"] <= budget_gb
            out.append(
                f"stream peak reserved + context {st['peak_reserved_gib']:.2f} GiB against the {budget_gb:g} GiB budget: "
                f"{'met' if ok else 'MISSED'} (the plan estimated {st['plan_peak_gib']:.2f} GiB)"
            )
    if "stream" in by and "stream_compiled" in by:
        st, co = by["stream"], by["stream_compiled"]
        out.append(
            f"compiled / eager stream step time: {co['step_s'] / st['step_s']:.2f}x "
            f"(compiling took {co['first_step_s'] - st['first_step_s']:.0f} s of the first step); "
            f"loss {co['loss']:.5f} against {st['loss']:.5f}"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="redheart-730m")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per row")
    ap.add_argument("--accum", type=int, default=16, help="micro-batches per optimizer step")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--budget-gb", type=float, default=8.0)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ALL_ROWS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per row")
    ap.add_argument("--json", type=Path, help="write the rows here too")
    ap.add_argument("--profile", type=Path, help="profile the last step of each row; tables to PATH.<row>.txt")
    ap.add_argument("--quick", action="store_true", help="3 steps and at most 75 s a row: the three rows within 4 min (gpu_check.sh gives them 250 s)")
    ap.add_argument("--row", choices=ALL_ROWS, help=argparse.SUPPRESS)  # one row, in this process
    args = ap.parse_args()
    if args.quick:
        args.steps, args.timeout = 3, min(args.timeout, 75)
    if args.row:
        print(json.dumps(run_row(args)))
        return
    if args.device == "cuda":
        print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    rows = []
    for row in args.rows.split(","):
        cmd = [sys.executable, "-m", "benchmarks.memory_gpu", "--row", row]
        for name in ("preset", "steps", "accum", "batch", "tokens", "budget_gb", "device"):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        if args.profile:
            cmd += ["--profile", f"{args.profile}.{row}.txt"]
        t0 = time.perf_counter()
        with tempfile.TemporaryFile("w+") as log:
            try:
                done = subprocess.run(
                    cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True, timeout=args.timeout
                )
                lines = done.stdout.strip().splitlines()
                result = json.loads(lines[-1]) if done.returncode == 0 and lines else None
                if result is None:
                    log.seek(0)
                    result = {
                        "row": row,
                        "error": f"exit {done.returncode}: {log.read().strip().splitlines()[-1:]}",
                    }
            except subprocess.TimeoutExpired:
                result = {"row": row, "error": f"timed out after {args.timeout} s"}
        result["wall_s"] = time.perf_counter() - t0
        rows.append(result)
        print(f"[{row}] {json.dumps(result)}", flush=True)
        if args.json:  # row by row, so an outer time limit keeps the rows already measured
            args.json.write_text(json.dumps(rows, indent=2))
    print()
    print(table(rows))
    for line in verdict(rows, args.budget_gb, args.device):
        print(line)


if __name__ == "__main__":
    main()
