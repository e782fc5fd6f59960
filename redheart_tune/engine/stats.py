"""What an epoch records besides its losses: weight and activation statistics, and peak memory."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ActivationStats", "peak_memory_mb", "weight_stats"]


def weight_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per-parameter weight statistics (mean, std, norm, sparsity = share of |w| < 1e-6)."""
    out = {}
    for name, p in model.named_parameters():
        w = p.detach().float()
        values = torch.stack(
            [
                w.mean(),
                w.std() if w.numel() > 1 else w.new_zeros(()),
                w.norm(),
                (w.abs() < 1e-6).float().mean(),
            ]
        ).tolist()
        out[name] = dict(zip(("mean", "std", "norm", "sparsity"), values, strict=True))
    return out


class ActivationStats:
    """Running mean, std and share of zeros of every module's activations (``RedHeart.forward_unit``'s
    ``record`` callback), kept as device tensors until ``result()``."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # module -> [n, sum, sum_sq, zeros]

    def __call__(self, module: str, t: torch.Tensor) -> None:
        t = t.detach().float()
        row = torch.stack([t.new_full((), float(t.numel())), t.sum(), (t * t).sum(), (t == 0).sum().float()])
        acc = self.sums.get(module)
        self.sums[module] = row.double() if acc is None else acc + row.double()

    def result(self) -> dict[str, dict[str, float]]:
        out = {}
        for key, acc in self.sums.items():
            n, s, sq, z = acc.tolist()
            mean = s / n
            out[key] = {"mean": mean, "std": math.sqrt(max(sq / n - mean * mean, 0.0)), "zero_share": z / n}
        return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
