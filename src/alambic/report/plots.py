"""Figures of the report, drawn from the run's json records (never from live models), as PNG files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

KEPT, REMOVED = "#2b6cb0", "#c0c0c0"


def plot_layer_importance(pruning: dict[str, Any], path: Path) -> Path | None:
    """One bar per teacher layer for each measured layer score; kept layers in colour, removed in grey."""
    imp = pruning.get("importance") or {}
    metrics = {
        name: imp[key]
        for name, key in (
            ("block influence  1 − cos(in, out)", "block_influence"),
            ("loss increase when skipped", "skip_loss_increase"),
        )
        if imp.get(key)
    }
    if not metrics:
        return None
    kept = set(pruning.get("kept_layers", []))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 2.4 * len(metrics)), squeeze=False)
    for ax, (title, values) in zip(axes[:, 0], metrics.items()):
        colors = [KEPT if i in kept else REMOVED for i in range(len(values))]
        ax.bar(range(len(values)), values, color=colors)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("teacher layer")
        ax.set_xlim(-0.6, len(values) - 0.4)
    axes[0, 0].legend(
        handles=[plt.Rectangle((0, 0), 1, 1, color=KEPT), plt.Rectangle((0, 0), 1, 1, color=REMOVED)],
        labels=["kept", "removed"],
        fontsize=8,
        loc="upper right",
    )
    return save_figure(fig, path)


def plot_head_importance(pruning: dict[str, Any], path: Path) -> Path | None:
    """Heat map of head scores (teacher layer × query head); removed heads hatched out."""
    imp = pruning.get("importance") or {}
    key = "head_gradient" if imp.get("head_gradient") else "head_activation"
    scores = imp.get(key)
    if not scores:
        return None
    import numpy as np

    grid = np.asarray(scores, dtype=float)  # (L, H)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * grid.shape[1] + 2), max(3, 0.22 * grid.shape[0] + 1)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="|∂L/∂mask|" if key == "head_gradient" else "mean ‖head output‖")
    plan = pruning.get("plan") or {}
    kept_layers, heads = plan.get("layers") or [], plan.get("heads")
    for layer in range(grid.shape[0]):
        kept = (
            heads[kept_layers.index(layer)]
            if heads and layer in kept_layers
            else (range(grid.shape[1]) if layer in kept_layers else [])
        )
        for head in set(range(grid.shape[1])) - set(kept):
            ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, hatch="xx", color="white", lw=0))
    ax.set_xlabel("query head")
    ax.set_ylabel("teacher layer")
    ax.set_title("attention head importance (hatched: removed)", fontsize=10)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The log records of a `metrics.jsonl`, in order; [] when there is none. Unreadable lines are skipped:
    a run killed mid-write leaves half a line at the end."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


# Logged every step but not curves worth a panel: bookkeeping, throughput, the end-of-training summary.
_NOT_CURVES = {
    "step",
    "time",
    "epoch",
    "tokens_per_second",
    "peak_memory_gib",
    "total_flos",
    "eval_runtime",
    "eval_samples_per_second",
    "eval_steps_per_second",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
    "train_loss",
}
_TITLES = {
    "loss": "loss (total objective)",
    "loss_soft": "loss_soft (divergence to the teacher)",
    "loss_hard": "loss_hard (cross-entropy on labels)",
    "eval_loss": "eval_loss (total, held-out)",
    "eval_loss_soft": "eval_loss_soft (held-out)",
    "eval_loss_hard": "eval_loss_hard (held-out)",
    "learning_rate": "learning rate",
    "grad_norm": "gradient norm (before clipping)",
}
RUN_COLORS = ("#2b6cb0", "#dd6b20", "#38a169", "#805ad5")


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    # A resumed run appends again from its checkpoint's step: the later record of a step wins.
    by_step = {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


_PARTS = ("loss", "loss_soft", "loss_hard")


def _curve_order(key: str) -> tuple[int, int, str]:
    # training objective and its parts, then the same held out, then other eval metrics, then the optimiser's
    name = key.removeprefix("eval_")
    held_out = key.startswith("eval_")
    group = int(held_out) if name == "loss" or name.startswith("loss_") else 3 - int(held_out)
    rank = _PARTS.index(name) if name in _PARTS else len(_PARTS)
    return group, rank, key


def plot_training_curves(runs: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """One panel per logged curve (each loss part, each eval metric, learning rate, grad norm) against the
    optimizer step, one line per run (e.g. the distilled student and its cross-entropy control).

    Args:
        runs: {label: records of `read_metrics`}; runs without records are left out.
        path: the PNG to write.

    Returns:
        `path`, or None when no run logged anything to plot.
    """
    runs = {label: records for label, records in runs.items() if records}
    keys = sorted(
        {
            k
            for records in runs.values()
            for r in records
            for k, v in r.items()
            if k not in _NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool)
        },
        key=_curve_order,
    )
    if not keys:
        return None
    cols = 2 if len(keys) > 1 else 1
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 2.9 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for color, (label, records) in zip(RUN_COLORS, runs.items()):
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 3 else None, ms=3, lw=1.4, color=color, label=label)
        ax.set_title(_TITLES.get(key, key), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(runs) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    return save_figure(fig, path)


_GAIN_TITLES = {
    "speedup": "speed-up (teacher latency ÷ model, batch 1)",
    "throughput_gain": "throughput (model ÷ teacher, batch B)",
    "size_reduction": "size reduction (teacher params ÷ model)",
    "memory_reduction": "memory reduction (teacher peak ÷ model)",
}


def plot_pareto(
    ret: dict[str, dict[str, float | None]],
    fronts: dict[str, list[str]],
    path: Path,
    *,
    label=str,
    quality: str = "perplexity",
) -> Path | None:
    """Quality kept (y) against each cost saving (x), one panel per saving measured; the Pareto front joined.

    Args:
        ret: `evaluation.pareto.retention` output; fronts: `pareto_fronts` output (names on each front).
        label: model name -> text shown next to its point.

    Returns:
        `path`, or None when no saving was measured for two models.
    """
    gains = [
        g for g in _GAIN_TITLES if sum(r.get(g) is not None and r.get(quality) is not None for r in ret.values()) > 1
    ]
    if not gains:
        return None
    fig, axes = plt.subplots(1, len(gains), figsize=(4.6 * len(gains), 3.8), squeeze=False)
    for ax, gain in zip(axes.flat, gains):
        points = {
            n: (r[gain], r[quality]) for n, r in ret.items() if r.get(gain) is not None and r.get(quality) is not None
        }
        front = fronts.get(gain, [])
        for color, (name, (x, y)) in zip(RUN_COLORS * 4, points.items()):
            ax.scatter(
                [x],
                [y],
                s=46 if name in front else 26,
                color=color,
                zorder=3,
                edgecolors="black" if name in front else "none",
            )
            ax.annotate(label(name), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if len(front) > 1:
            ax.plot(
                [points[n][0] for n in front],
                [points[n][1] for n in front],
                color="gray",
                lw=1,
                ls="--",
                zorder=2,
                label="Pareto front",
            )
            ax.legend(fontsize=8, loc="lower left")
        ax.axhline(1.0, color="gray", lw=0.6, alpha=0.5)
        ax.axvline(1.0, color="gray", lw=0.6, alpha=0.5)
        ax.set_xlabel(_GAIN_TITLES[gain], fontsize=9)
        ax.set_ylabel(f"{quality} kept (teacher = 1)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("quality kept against cost saved", fontsize=10)
    return save_figure(fig, path)
