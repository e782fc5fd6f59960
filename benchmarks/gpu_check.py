"""GPU checks in one run: the real training loop under bf16 and fp16 autocast, the enforced GPU share, the 730M step.

The device machine has no Ray and no sentence encoder, so the data travel as an
export of already-encoded smoke data:

    python benchmarks/gpu_check.py --export gpucheck/smoke.npz     # here, on CPU
    python benchmarks/gpu_check.py --data gpucheck/smoke.npz       # on the GPU machine

Prints per check: losses (finite), epoch time, peak GPU memory; whether a 0.5
share (torch.cuda.set_per_process_memory_fraction) stops an allocation beyond it;
and the redheart-730m optimizer step at batch 4 with bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.tasks import TaskSpec  # noqa: E402
from tune.config import load_config  # noqa: E402
from tune.data import EncodedData  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def export(path: Path) -> None:
    from tune.config import cache_dir
    from tune.data import prepare_data

    cfg = load_config(REPO / "configs" / "smoke.yaml", ["data.max_samples=1200"])
    d = prepare_data(cfg.data, cache_dir(cfg), show_progress=True)
    tokens = np.concatenate([d.tokens[s : s + n] for s, n in zip(d.token_start, d.token_length, strict=True)])
    starts = np.concatenate([[0], np.cumsum(d.token_length)[:-1]]).astype(np.int64)
    arrays = {"tokens": tokens, "token_start": starts, "token_length": d.token_length, "pooled": d.pooled}
    arrays |= {f"target/{t}": v for t, v in d.targets.items()} | {
        f"mask/{t}": v for t, v in d.target_mask.items()
    }
    arrays |= {f"split/{s}": v for s, v in d.splits.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    meta = {
        "ids": list(d.ids),
        "tasks": {t: {"kind": s.kind, "labels": list(s.labels)} for t, s in d.tasks.items()},
        "split_params": d.split_params,
        "fingerprint": d.fingerprint,
        "encoder": d.encoder,
        "max_tokens": d.max_tokens,
    }
    path.with_suffix(".json").write_text(json.dumps(meta))
    print(f"exported {len(d)} rows to {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def load(path: Path) -> EncodedData:
    a = np.load(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    tasks = {t: TaskSpec(t, s["kind"], tuple(s["labels"])) for t, s in meta["tasks"].items()}
    pick = lambda prefix: {k.split("/", 1)[1]: a[k] for k in a.files if k.startswith(prefix)}  # noqa: E731
    return EncodedData(
        tokens=a["tokens"],
        token_start=a["token_start"],
        token_length=a["token_length"],
        pooled=a["pooled"],
        targets=pick("target/"),
        target_mask=pick("mask/"),
        ids=tuple(meta["ids"]),
        texts=None,
        tasks=tasks,
        splits=pick("split/"),
        split_params=meta["split_params"],
        fingerprint=meta["fingerprint"],
        encoder=meta["encoder"],
        max_tokens=meta["max_tokens"],
    )


def train_check(data: EncodedData, precision: str, epochs: int) -> None:
    from tune.loop import build_training, train_epoch, validate_state

    cfg = load_config(REPO / "configs" / "smoke.yaml", [f"optim.precision={precision}", "optim.lr=1e-3"])
    device = torch.device("cuda", 0)
    torch.cuda.reset_peak_memory_stats(device)
    state = build_training(cfg, data, cfg.optim.lr, epochs, device)
    print(
        f"[{precision}] autocast dtype {state.autocast_dtype}, grad scaler enabled: {state.scaler.is_enabled()}"
    )
    for epoch in range(1, epochs + 1):
        tr = train_epoch(state, data, epoch, collect_grad_stats=True)
        val = validate_state(state, data)
        assert np.isfinite(tr.loss) and np.isfinite(val.loss)
        print(
            f"[{precision}] epoch {epoch}: train {tr.loss:.4f} val {val.loss:.4f} acc {val.accuracy:.3f} "
            f"grad {tr.grad_norm:.2f} {tr.seconds:.2f}s peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        )


def share_check() -> None:
    from tune.resources import trial_device

    device = trial_device(0.5)
    total = torch.cuda.get_device_properties(device).total_memory
    ok = torch.empty(int(0.3 * total), dtype=torch.uint8, device=device)
    del ok
    torch.cuda.empty_cache()
    try:
        torch.empty(int(0.6 * total), dtype=torch.uint8, device=device)
        print("[share] 0.5 share NOT enforced: a 0.6 allocation succeeded")
    except torch.OutOfMemoryError:
        print("[share] 0.5 share enforced: 0.3 of the card allocated, 0.6 refused with OutOfMemoryError")
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    if args.export:
        export(args.export)
        return
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    data = load(args.data)
    t0 = time.perf_counter()
    train_check(data, "auto", args.epochs)
    train_check(data, "fp16", 2)
    share_check()
    print(f"checks took {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
