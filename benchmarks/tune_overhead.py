"""Tune overhead: the same epochs in a bare loop and through Ray Tune, in one run; prints the ratio.

    python benchmarks/tune_overhead.py                       # default config, 6 epochs, 4000 samples
    python benchmarks/tune_overhead.py --epochs 10           # the figure in docs/benchmarks.md
    python benchmarks/tune_overhead.py --epochs 4 --samples 2000

Both sides train the same model on the same data with the same seed and
checkpoint on the same epochs; the Tune side's wall time includes trial start-up,
data loading inside the trial, reporting and persisting checkpoints (Ray itself is
started before the clock).  Target: at most 1.05 once an epoch takes 2 s or more.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--cache", default=None, help="data cache dir (default: the config's)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads on both sides (default: the config's)"
    )
    args = ap.parse_args()

    import torch

    from redheart_tune.config import cache_dir, load_config
    from redheart_tune.data import prepare_data
    from redheart_tune.engine.checkpoints import write_checkpoint
    from redheart_tune.engine.loop import build_training, train_epoch
    from redheart_tune.engine.stats import weight_stats
    from redheart_tune.engine.validation import validate_state
    from redheart_tune.tune.resources import start_ray, torch_threads
    from redheart_tune.tune.train import run_train
    from redheart_tune.tune.trainable import is_checkpoint_epoch, resume_state

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"run.output_root={tmp}",
            f"train.epochs={args.epochs}",
            f"data.max_samples={args.samples}",
            "resources.gpu=0",
        ]
        if args.cache:
            overrides.append(f"data.cache_dir={args.cache}")
        if args.threads:
            overrides.append(f"resources.torch_threads={args.threads}")
        cfg = load_config(args.config, overrides)
        if not args.cache:
            cfg = load_config(
                args.config, [*overrides, f"data.cache_dir={cache_dir(load_config(args.config))}"]
            )
        data = prepare_data(cfg.data, cache_dir(cfg), show_progress=True)
        # The count the trial picks for itself (tune.resources.trial_threads), so both sides use the same.
        threads = cfg.resources.torch_threads or torch_threads(cfg.resources.cpus_per_trial)
        torch.set_num_threads(threads)

        # Bare loop: the same work the trial does, checkpoints included.
        t0 = time.perf_counter()
        state = build_training(cfg, data, cfg.optim.lr, cfg.train.epochs, torch.device("cpu"))
        epoch_times = []
        for epoch in range(1, cfg.train.epochs + 1):
            e0 = time.perf_counter()
            save = is_checkpoint_epoch(epoch, cfg)
            tr = train_epoch(state, data, epoch, collect_grad_stats=save)
            val = validate_state(state, data, collect_activations=save)
            if save:
                write_checkpoint(
                    Path(tmp) / "bare" / f"epoch_{epoch:04d}",
                    model_state=state.model.state_dict(),
                    metrics={"grad": tr.grad_stats, "w": weight_stats(state.model), "a": val.activations},
                    meta={"epoch": epoch},
                    resume_state=resume_state(state, epoch),
                )
            epoch_times.append(time.perf_counter() - e0)
        bare = time.perf_counter() - t0

        start_ray(cfg, include_dashboard=False)
        t0 = time.perf_counter()
        results = run_train(cfg, "the config (optim.lr)")
        tuned = time.perf_counter() - t0
        # Tune's own per-iteration wall time: train + validate + report (+ checkpoint persisted).
        iters = results[0].metrics_dataframe["time_this_iter_s"].tolist()
        trial_threads = json.loads((Path(results[0].checkpoint.path) / "meta.json").read_text())["device"][
            "threads"
        ]

    import ray

    ray.shutdown()
    mean_epoch = sum(epoch_times) / len(epoch_times)
    print(
        f"\nepochs: {cfg.train.epochs}, train samples: {len(data.splits['train'])}, "
        f"torch threads: bare {threads}, trial {trial_threads}"
    )
    print(f"bare loop:   {bare:7.2f} s  ({mean_epoch:.2f} s per epoch)")
    print(f"through Tune:{tuned:7.2f} s")
    print(f"ratio Tune / bare: {tuned / bare:.3f}  (target <= 1.05 once an epoch takes >= 2 s)")
    per_epoch = (sum(iters) / len(iters)) / mean_epoch
    print(f"per epoch inside the trial: {sum(iters) / len(iters):.2f} s, ratio {per_epoch:.3f}")
    plain = [t for e, t in enumerate(iters, 1) if not is_checkpoint_epoch(e, cfg)]
    bare_plain = [t for e, t in enumerate(epoch_times, 1) if not is_checkpoint_epoch(e, cfg)]
    if plain:
        print(
            f"  epochs without a checkpoint: Tune {sum(plain) / len(plain):.2f} s, bare {sum(bare_plain) / len(bare_plain):.2f} s"
        )
    print(f"fixed cost (trial start, imports, data load, teardown): {tuned - sum(iters):.1f} s")


if __name__ == "__main__":
    main()
