"""Training-step throughput of the model family.

CPU: forward+backward samples/s of the tiny preset (batch 32, 48 tokens, input 384).
CUDA (when available): step time (forward+backward+AdamW) and peak memory of
redheart-730m and mid at batch 4 under bf16 autocast.

    python -m benchmarks.model_step [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.synthetic import TASKS
from redheart_tune.model.family import build_model, param_counts
from redheart_tune.model.losses import module_losses, total_loss
from redheart_tune.model.presets import ModelConfig

TASK_WEIGHTS = dict.fromkeys(TASKS, 1.0)


def synthetic_batch(B: int, T: int, E: int, device: str, seed: int = 0):
    """Encoder-shaped inputs (right-padded, varied lengths) and targets that follow the TaskSpecs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T) < lengths[:, None]  # (B, T)
    tokens = torch.randn(B, T, E, generator=g) * mask[..., None]  # (B, T, E)
    pooled = tokens.sum(1) / lengths[:, None]  # (B, E)
    targets = {
        "emotion": torch.softmax(torch.randn(B, 7, generator=g), -1),
        "bentham": torch.rand(B, 4, generator=g),
        "regret": torch.rand(B, 1, generator=g),
        "surd": torch.rand(B, 4, generator=g),
    }
    target_mask = {t: torch.ones(B, dtype=torch.bool) for t in TASKS}
    move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return tokens.to(device), mask.to(device), pooled.to(device), move(targets), move(target_mask)


def cpu_tiny(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), TASKS, args.input_dim).train()
    tokens, mask, pooled, targets, target_mask = synthetic_batch(
        args.batch, args.tokens, args.input_dim, "cpu"
    )
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        losses = module_losses(model(tokens, mask, pooled), targets, target_mask, TASKS)
        total_loss(losses, TASK_WEIGHTS).backward()
        model.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    med = statistics.median(times)
    print(
        f"cpu tiny ({sum(param_counts(model).values()) / 1e6:.2f}M params, {torch.get_num_threads()} threads): "
        f"forward+backward batch {args.batch} x {args.tokens} tokens: median {1000 * med:.1f} ms "
        f"(min {1000 * min(times):.1f}), {args.batch / med:.0f} samples/s"
    )


def cuda_step(preset: str, args: argparse.Namespace) -> None:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU: 730M parameters take long on the CPU
        model = build_model(ModelConfig(preset=preset), TASKS, args.input_dim).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    tokens, mask, pooled, targets, target_mask = synthetic_batch(
        args.gpu_batch, args.gpu_tokens, args.input_dim, "cuda"
    )
    times = []
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs = model(tokens, mask, pooled)
        loss = total_loss(module_losses(outputs, targets, target_mask, TASKS), TASK_WEIGHTS)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    n = sum(param_counts(model).values())
    med = statistics.median(times)
    print(
        f"cuda {preset} ({n / 1e6:.1f}M params, bf16 autocast, AdamW): batch {args.gpu_batch} x {args.gpu_tokens} "
        f"tokens: step median {1000 * med:.0f} ms, {args.gpu_batch / med:.1f} samples/s, "
        f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, loss {loss.item():.4f}"
    )
    del model, opt


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--input-dim", type=int, default=384)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--gpu-batch", type=int, default=4)
    parser.add_argument("--gpu-tokens", type=int, default=128, help="MiniLM tokens of a 512-character text")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_cpu:
        cpu_tiny(args)
    if torch.cuda.is_available():
        for preset in ("redheart-730m", "mid"):
            cuda_step(preset, args)
    else:
        print("no CUDA device: skipping redheart-730m and mid")


if __name__ == "__main__":
    main()
