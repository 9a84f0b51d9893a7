"""Figures of the report, drawn from the run's json records (never from live models), as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

KEPT, REMOVED = "#2b6cb0", "#c0c0c0"


def plot_layer_importance(pruning: dict[str, Any], path: Path) -> Path | None:
    """One bar per teacher layer for each measured layer score; kept layers in colour, removed in grey."""
    imp = pruning.get("importance") or {}
    metrics = {name: imp[key] for name, key in (("block influence  1 − cos(in, out)", "block_influence"),
                                                ("loss increase when skipped", "skip_loss_increase"))
               if imp.get(key)}
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
    axes[0, 0].legend(handles=[plt.Rectangle((0, 0), 1, 1, color=KEPT), plt.Rectangle((0, 0), 1, 1, color=REMOVED)],
                      labels=["kept", "removed"], fontsize=8, loc="upper right")
    return _save(fig, path)


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
        kept = heads[kept_layers.index(layer)] if heads and layer in kept_layers else (
            range(grid.shape[1]) if layer in kept_layers else [])
        for head in set(range(grid.shape[1])) - set(kept):
            ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, hatch="xx", color="white", lw=0))
    ax.set_xlabel("query head")
    ax.set_ylabel("teacher layer")
    ax.set_title("attention head importance (hatched: removed)", fontsize=10)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
