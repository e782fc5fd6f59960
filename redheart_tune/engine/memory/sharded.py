"""A streamed unit's AdamW step with its moments at home: through the device shard by shard.

Gradients of parameters outside the current shard are hidden (AdamW skips a parameter whose
``grad`` is None), so each call updates exactly one shard, with the same arithmetic as one step
over the whole unit.  A shard is a contiguous range of the unit's flat buffers: one copy per moment
each way.  The next shard's moments are copied in while the current one steps.
"""

from __future__ import annotations

import torch

from redheart_tune.engine.memory.sizes import MOMENT_BYTES, shard_partition
from redheart_tune.engine.memory.transfer import MOMENTS, Meter, Mover, Slot


def sharded_step(
    slot: Slot,
    optimizer: torch.optim.Optimizer,
    home: dict[str, torch.Tensor],
    *,
    first: bool,
    shard_bytes: int,
    device: torch.device,
    mover: Mover,
    meter: Meter,
) -> None:
    """AdamW's step for ``slot`` (on the device) with its moments in ``home`` (flat, on the CPU), shard
    by shard; ``first``: AdamW has no moments yet and creates them on the device, shard by shard."""
    unit = slot.name
    shards = shard_partition(slot.sizes, shard_bytes)
    grads = [p.grad for p in slot.params]
    opt_state = optimizer.state
    home_views = {m: slot.views(home[m]) for m in MOMENTS}

    def span(idx: list[int]) -> tuple[int, int]:
        return slot.offsets[idx[0]], slot.offsets[idx[-1]] + slot.sizes[idx[-1]]

    def fetch(k: int) -> tuple[dict[str, torch.Tensor], object | None]:
        if first:
            return {}, None
        lo, hi = span(shards[k])
        bufs = {m: torch.empty(hi - lo, dtype=torch.float32, device=device) for m in MOMENTS}
        before = meter.now()
        event, timing = mover.copy([(bufs[m], home[m][lo:hi]) for m in MOMENTS], "in")
        meter.live += MOMENT_BYTES * (hi - lo)
        meter.record(unit, "moments_in", MOMENT_BYTES * (hi - lo), before, timing)
        return bufs, event

    pending = fetch(0)
    for k, idx in enumerate(shards):
        bufs, event = pending
        if k + 1 < len(shards):
            pending = fetch(k + 1)  # overlaps with this shard's step
        mover.wait(event)
        lo, hi = span(idx)
        nbytes = MOMENT_BYTES * (hi - lo)
        if first:
            meter.live += nbytes  # AdamW creates them on the device in this step
        else:
            for m in MOMENTS:
                for i in idx:
                    a = slot.offsets[i] - lo
                    opt_state[slot.params[i]][m] = bufs[m][a : a + slot.sizes[i]].view(slot.params[i].shape)
        in_shard = set(idx)
        for i, p in enumerate(slot.params):
            p.grad = grads[i] if i in in_shard else None
        optimizer.step()
        meter.note()
        # back home: one copy per moment (from the shard buffers), or per parameter (fresh ones)
        before = meter.now()
        if first:
            pairs = [(home_views[m][i], opt_state[slot.params[i]][m]) for m in MOMENTS for i in idx]
        else:
            pairs = [(home[m][lo:hi], bufs[m]) for m in MOMENTS]
        out_event, timing = mover.copy(pairs, "out")
        mover.wait(out_event)
        # this shard's device buffers go now, in the compute stream's order: the next fetch may reuse
        # them, so at most two shards (one stepping, one arriving) are ever on the device
        del pairs, bufs
        for m in MOMENTS:
            for i in idx:
                opt_state[slot.params[i]][m] = home_views[m][i]
        meter.live -= nbytes
        meter.record(unit, "moments_out", nbytes, before, timing)
    for p, g in zip(slot.params, grads, strict=True):
        p.grad = g
