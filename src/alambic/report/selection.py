"""The teacher-entropy selection's figure: the histogram of sequence scores with the kept band (`data.select`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from alambic.report.plots import KEPT, REMOVED, plt, save_figure


def plot_entropy_histogram(record: dict[str, Any], path: Path) -> Path | None:
    """Histogram of the sequence scores, the kept band in colour; None when the record has no histogram."""
    hist = record.get("histogram")
    if not hist or not hist.get("counts"):
        return None
    edges, counts, kept = np.asarray(hist["edges"]), np.asarray(hist["counts"]), np.asarray(hist["kept_counts"])
    widths, lefts = np.diff(edges), edges[:-1]
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.bar(lefts, counts - kept, width=widths, align="edge", color=REMOVED, label="left out")
    ax.bar(
        lefts,
        kept,
        width=widths,
        align="edge",
        bottom=counts - kept,
        color=KEPT,
        label=f"kept ({record['band']} {record['keep_fraction']:.0%})",
    )
    ax.set_xlabel("mean teacher token entropy (nats)")
    ax.set_ylabel("training sequences")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
