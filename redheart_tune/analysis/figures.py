"""The paper's figures, each a PNG with the CSV behind it written beside it."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a training box
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig, path: Path, data: pd.DataFrame) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data.to_csv(path.with_suffix(".csv"), index=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def lr_sweep_figure(rows: pd.DataFrame, best_lr: float, path: Path) -> Path:
    """Figure 1: loss and accuracy per epoch for each candidate LR, and the selection score per LR.

    ``rows`` is ``SweepResult.rows()``: one row per trial and epoch with ``lr_peak``,
    ``epoch``, ``train_loss``, ``val_loss``, ``val_acc`` and the trial's
    ``selection_score``; the PNG's CSV (``lr_sweep.csv``) is this table.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    scores = rows.groupby("lr_peak")["selection_score"].first()
    for i, (lr, df) in enumerate(rows.groupby("lr_peak")):
        color, chosen = f"C{i}", lr == best_lr
        score = scores[lr]
        label = f"lr {lr:.1e}  score {score:.4f}" if np.isfinite(score) else f"lr {lr:.1e}  diverged"
        label += "  (chosen)" if chosen else ""
        width = 2.5 if chosen else 1.2
        axes[0].plot(df["epoch"], df["val_loss"], color=color, lw=width, marker="o", label=label)
        axes[0].plot(df["epoch"], df["train_loss"], color=color, lw=1, ls="--")
        axes[1].plot(df["epoch"], df["val_acc"], color=color, lw=width, marker="o", label=label)
    handles, labels = axes[0].get_legend_handles_labels()
    styles = [Line2D([], [], color="k", lw=1.5), Line2D([], [], color="k", lw=1, ls="--")]
    axes[0].legend(handles + styles, labels + ["validation (solid)", "training (dashed)"], fontsize=7)
    axes[0].set(xlabel="epoch", ylabel="loss (weighted mean of the module losses)", title="LR sweep: loss")
    axes[1].set(xlabel="epoch", ylabel="emotion accuracy, validation", title="LR sweep: validation accuracy")
    axes[1].legend(fontsize=7)
    finite = scores[np.isfinite(scores)]
    axes[2].plot(finite.index, finite.to_numpy(), color="0.4", marker="o")
    if best_lr in finite.index:
        axes[2].scatter(
            [best_lr], [finite[best_lr]], s=120, facecolors="none", edgecolors="C3", lw=2, zorder=3
        )
    axes[2].set_xscale("log")
    axes[2].set(
        xlabel="peak learning rate",
        ylabel="mean val loss (last 3) + w·|train − val| (last)",
        title="Selection score per LR (lower wins; circled: chosen)",
    )
    for ax in axes[:2]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, path, rows)


def learning_curves_figure(
    epochs: pd.DataFrame, path: Path, checkpoint_epochs: list[int] | None = None
) -> Path:
    """Figure 2: train and validation loss per epoch, and each group's validation loss.

    ``epochs`` is the run's per-epoch table (``TrainingRun.epochs``); the
    ``val_group_loss/<group>`` columns give the right panel.  Checkpoint epochs
    are marked on the validation curve.
    """
    group_cols = [c for c in epochs.columns if c.startswith("val_group_loss/")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(epochs["epoch"], epochs["train_loss"], marker=".", label="train")
    axes[0].plot(epochs["epoch"], epochs["val_loss"], marker=".", label="validation")
    if checkpoint_epochs:
        marked = epochs[epochs["epoch"].isin(checkpoint_epochs)]
        axes[0].scatter(
            marked["epoch"], marked["val_loss"], marker="s", s=18, color="k", zorder=3, label="checkpoint"
        )
    axes[0].set(xlabel="epoch", ylabel="loss", title="Learning curves")
    for i, col in enumerate(group_cols):
        axes[1].plot(epochs["epoch"], epochs[col], marker=".", color=f"C{i}", label=col.split("/", 1)[1])
    if not group_cols:  # say so on the figure rather than leave a silently empty panel
        axes[1].text(0.5, 0.5, "no val_group_loss/<group> recorded", ha="center", transform=axes[1].transAxes)
    axes[1].set(xlabel="epoch", ylabel="validation loss", title="Validation loss per module group")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    cols = ["epoch", "train_loss", "val_loss", *group_cols]
    return _save(fig, path, epochs[cols])


def sweet_spot_heatmap(modules: pd.DataFrame, spots: dict[str, int], path: Path) -> Path:
    """Figure 3: validation loss per module (rows) and checkpoint epoch (columns); each row's chosen epoch boxed.

    ``modules`` is ``TrainingRun.modules`` (epoch, module, unit, val_loss);
    ``spots`` maps unit -> epoch.  Each row is scaled to its own range (the
    modules' losses differ in size); the CSV keeps the raw losses.
    """
    from redheart_tune.model.groups import (
        MODULES,  # rows in the declaration's order: group A, B, C, independent
    )

    present = set(modules["module"])
    order = [m for m in MODULES if m in present]
    grid = modules.pivot(index="module", columns="epoch", values="val_loss").reindex(order)
    lo, hi = grid.min(axis=1), grid.max(axis=1)
    scaled = grid.sub(lo, axis=0).div((hi - lo).where(hi > lo, 1.0), axis=0)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * grid.shape[1] + 3), 0.35 * grid.shape[0] + 1.5))
    im = ax.imshow(scaled.to_numpy(dtype=float), aspect="auto", cmap="viridis_r", vmin=0, vmax=1)
    ax.set_xticks(range(grid.shape[1]), [str(e) for e in grid.columns], fontsize=7)
    ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=7)
    unit_of = modules.drop_duplicates("module").set_index("module")["unit"]
    epochs = list(grid.columns)
    for row, module in enumerate(grid.index):
        chosen = spots.get(unit_of[module])
        if chosen in epochs:
            col = epochs.index(chosen)
            ax.add_patch(plt.Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
    ax.set(xlabel="epoch", title="Validation loss per module (row-scaled; red: chosen sweet spot)")
    fig.colorbar(im, ax=ax, label="row-scaled loss (0 = row minimum)")
    data = modules[["epoch", "module", "unit", "val_loss"]].copy()
    data["chosen"] = [spots.get(u) == e for u, e in zip(data["unit"], data["epoch"], strict=True)]
    return _save(fig, path, data)


GROUP_WISE = ("crossover", "crossover_ensemble", "group_window_soup", "group_greedy_soup", "learned_fusion")
"""The methods built unit by unit from the group declaration (drawn in red); the rest are whole-model baselines."""


def methods_figure(intervals: pd.DataFrame, metric: str, path: Path) -> Path:
    """Figure 4: every method's ``metric`` on each held-out set, with its 95 % bootstrap interval.

    ``intervals`` is ``analysis.uncertainty.interval_table``'s table (one row per method, split and
    metric: the mean over seeds and the interval over resampled sentences).  One bar per method and
    set; the group-wise methods in red, the whole-model baselines in blue; the best single checkpoint's
    value on each set is a dashed line.
    """
    table = intervals[intervals["metric"] == metric]
    methods = table["method"].drop_duplicates().tolist()
    splits = table["split"].drop_duplicates().tolist()
    width = 0.8 / len(splits)
    fig, ax = plt.subplots(figsize=(max(7, 0.95 * len(methods) + 2), 4.5))
    x = np.arange(len(methods))
    for j, split in enumerate(splits):
        part = table[table["split"] == split].set_index("method").reindex(methods)
        err = np.stack([part["value"] - part["ci_low"], part["ci_high"] - part["value"]])
        colors = ["C3" if m in GROUP_WISE else "C0" for m in methods]
        n_rows = int(part["n_rows"].max())
        ax.bar(
            x + (j - (len(splits) - 1) / 2) * width,
            part["value"],
            width,
            yerr=err,
            capsize=3,
            color=colors,
            alpha=1.0 if j == len(splits) - 1 else 0.5,
            label=f"{split} ({n_rows:,} rows)",
        )
        if "best_single" in part.index:
            ax.axhline(part.loc["best_single", "value"], color="0.3", ls="--", lw=0.8)
    low, high = table["ci_low"].min(), table["ci_high"].max()
    pad = 0.15 * (high - low) if high > low else 0.01
    ax.set_ylim(low - pad, high + pad)
    ax.set_xticks(x, methods, rotation=30, ha="right")
    seeds = int(table["n_seeds"].max())
    ax.set(
        ylabel=metric,
        title=f"{metric}, mean over {seeds} seed(s); bars: 95 % bootstrap interval over sentences "
        "(red: group-wise; dashed: best single)",
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path, table)


def memory_figure(epochs: pd.DataFrame, path: Path, details: dict[int, dict] | None = None) -> Path | None:
    """Figure 5, DSM efficiency: memory use over optimizer steps, the budget, and every swap.

    ``details`` (epoch -> a checkpoint's metrics.json, ``TrainingRun.details``)
    carries the memory component's records when the run managed device memory (a
    GPU, or byte accounting with ``memory.strategy: stream``): each unit turn's
    peak use, every move between GPU and CPU, the budget.  The top panel shows
    each optimizer step's peak use against the budget and the target, with the
    swap manager's swap_out / swap_in marked; the bottom one the bytes moved per
    step.  A run without such records (a CPU run with everything resident) gets
    its peak memory per epoch instead; None when there is nothing at all.
    """
    records = [d["memory"] for _, d in sorted((details or {}).items()) if d.get("memory", {}).get("trace")]
    if records:
        return _dsm_figure(records, path)
    if "peak_memory_mb" not in epochs.columns or epochs["peak_memory_mb"].isna().all():
        return None
    kind = epochs["memory_kind"].dropna().iloc[-1] if "memory_kind" in epochs.columns else "unknown"
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(epochs["epoch"], epochs["peak_memory_mb"], marker=".")
    ax.set(
        xlabel="epoch", ylabel=f"peak memory (MiB, {kind})", title="Memory use per epoch (no swap records)"
    )
    ax.grid(alpha=0.3)
    cols = ["epoch", "peak_memory_mb", *(["memory_kind"] if "memory_kind" in epochs.columns else [])]
    return _save(fig, path, epochs[cols])


def _dsm_figure(records: list[dict], path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    trace = pd.DataFrame([t for r in records for t in r["trace"]])
    moves = pd.DataFrame([m for r in records for m in r["moves"]])
    budget, target = records[-1]["budget_bytes"], records[-1]["target"]
    steps = trace.groupby(["epoch", "step"], as_index=False)["peak_bytes"].max()
    steps["global_step"] = range(1, len(steps) + 1)
    # Training moves per step; a validation pass's weights-only visits (eval_in) are not a step's traffic.
    training = moves[~moves["action"].str.startswith("eval")] if len(moves) else moves
    if len(training):
        moved = training.groupby(["epoch", "step"])["bytes"].sum().rename("moved_bytes")
        steps = steps.merge(moved, on=["epoch", "step"], how="left")
    else:
        steps["moved_bytes"] = 0
    steps["moved_bytes"] = steps["moved_bytes"].fillna(0)
    unit, name = (2**30, "GiB") if budget >= 2**30 else (2**20, "MiB")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, height_ratios=(3, 1.4))
    top.plot(steps["global_step"], steps["peak_bytes"] / unit, lw=1, label="peak use of each optimizer step")
    top.axhline(budget / unit, color="k", lw=1.2, label="budget")
    top.axhline(target * budget / unit, color="k", ls="--", lw=1, label=f"target ({target:g} x budget)")
    for action, marker, color in (("swap_out", "v", "C3"), ("swap_in", "^", "C2")):
        hits = moves[moves["action"] == action] if len(moves) else moves
        hits = hits.merge(steps[["epoch", "step", "global_step", "peak_bytes"]], on=["epoch", "step"])
        if len(hits):
            top.scatter(
                hits["global_step"],
                hits["peak_bytes"] / unit,
                marker=marker,
                color=color,
                s=40,
                zorder=3,
                label=action,
            )
            steps[action] = (
                steps["global_step"].map(hits.groupby("global_step")["module"].agg(" ".join)).fillna("")
            )
    top.set_ylim(0, 1.08 * max(budget, steps["peak_bytes"].max()) / unit)
    top.set(ylabel=f"memory ({name})", title="DSM efficiency: memory use and the swap pattern")
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="lower right")
    bottom.plot(steps["global_step"], steps["moved_bytes"] / unit, color="C1", lw=1)
    bottom.set_ylim(bottom=0)
    bottom.set(
        xlabel="optimizer step", ylabel=f"moved ({name})", title="bytes moved between CPU and GPU per step"
    )
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.grid(alpha=0.3)
    return _save(fig, path, steps)
