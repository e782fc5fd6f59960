"""Parameter counts per module and group, and a training-memory estimate, printable as a table.

Built on the meta device, so even redheart-730m is counted without allocating
its weights.
"""

from __future__ import annotations

import torch

from redheart_tune.model.family import build_model, group_param_counts, param_counts
from redheart_tune.model.groups import GROUP_OF
from redheart_tune.model.presets import TARGETS_730M, TOTAL_730M, ModelConfig
from redheart_tune.model.tasks import TaskSpec

CARD_BYTES = 8 * 2**30
"""The original's card: an 8 GB RTX 2070 SUPER."""
MEMORY_COUNTED = (
    "fp32 weights, grads and AdamW's 2 moments; with bf16 autocast also the bf16 weight casts; "
    "not activations, CUDA context or fragmentation"
)


def memory_estimate(n_params: int) -> dict:
    """Bytes of training state for ``n_params`` parameters with AdamW, fp32 and bf16 autocast.

    Counted: weights, gradients and AdamW's two moments (all fp32), and under bf16
    autocast also the bf16 copies of the weights autocast caches for the forward
    (autocast keeps fp32 master weights).  Not counted: activations (bf16 under
    autocast), the CUDA context, allocator fragmentation.
    """
    fp32 = {"weights": 4 * n_params, "grads": 4 * n_params, "adamw_states": 8 * n_params}
    # Autocast keeps fp32 master weights, grads and states; it adds a bf16 cast of each weight.
    bf16 = {**fp32, "bf16_weight_casts": 2 * n_params}
    report = {"counted": MEMORY_COUNTED, "card_bytes": CARD_BYTES}
    for name, parts in (("fp32", fp32), ("bf16_autocast", bf16)):
        total = sum(parts.values())
        report[name] = {
            **parts,
            "total": total,
            "share_of_card": total / CARD_BYTES,
            "fits": total < CARD_BYTES,
        }
    return report


def params_report(cfg: ModelConfig, tasks: dict[str, TaskSpec], input_dim: int) -> dict:
    """JSON-ready counts per module and group, the 730M targets where that preset is chosen, and memory."""
    with torch.device("meta"):
        model = build_model(cfg, tasks, input_dim)
    counts = param_counts(model)
    total = sum(counts.values())
    report = {
        "preset": cfg.preset,
        "input_dim": input_dim,
        "modules": {m: {"group": GROUP_OF[m], "params": n} for m, n in counts.items()},
        "groups": group_param_counts(model),
        "total": total,
        "memory": memory_estimate(total),
    }
    if cfg.preset == "redheart-730m":
        report["targets"] = [
            {
                "modules": list(mods),
                "params": sum(counts[m] for m in mods),
                "target": target,
                "deviation_pct": 100 * (sum(counts[m] for m in mods) - target) / target,
            }
            for mods, target in TARGETS_730M.items()
        ]
        report["total_range"] = list(TOTAL_730M)
    return report


def format_params_report(report: dict) -> str:
    """A readable table of ``params_report``'s output."""
    lines = [f"preset {report['preset']}, input_dim {report['input_dim']}", ""]
    lines.append(f"{'module':<20} {'group':<12} {'params':>14}")
    for m, row in report["modules"].items():
        lines.append(f"{m:<20} {row['group']:<12} {row['params']:>14,}")
    lines += ["", f"{'group':<33} {'params':>14}"]
    for g, n in report["groups"].items():
        lines.append(f"{g:<33} {n:>14,}")
    lines.append(f"{'total':<33} {report['total']:>14,}")
    if "targets" in report:
        lo, hi = report["total_range"]
        lines += ["", f"{'vs. the original (730M)':<26} {'params':>14} {'target':>14} {'dev':>8}"]
        for row in report["targets"]:
            name = "+".join(row["modules"])
            lines.append(
                f"{name:<26} {row['params']:>14,} {row['target']:>14,} {row['deviation_pct']:>+7.2f}%"
            )
        lines.append(f"{'total':<26} {report['total']:>14,} {f'{lo / 1e6:.0f}-{hi / 1e6:.0f}M':>14}")
    mem = report["memory"]
    lines += ["", f"training memory (counted: {mem['counted']})"]
    for name in ("fp32", "bf16_autocast"):
        row = mem[name]
        verdict = "fits" if row["fits"] else "does NOT fit"
        lines.append(
            f"  {name:<14} {row['total'] / 2**30:8.2f} GiB = {100 * row['share_of_card']:5.1f}% of an "
            f"{mem['card_bytes'] / 2**30:.0f} GiB card ({verdict}, before activations)"
        )
    return "\n".join(lines)
