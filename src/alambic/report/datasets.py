"""The report's section on the extra held-out sets (`evaluation.datasets`): a table per set, a retention table across
the sets (the run's own held-out split first), and a plot of the perplexity each model keeps per set, so a student
that keeps 90 % on the training domain but 60 % elsewhere shows at a glance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alambic.report.markdown import (
    kl,
    model_label,
    percent,
    perplexity,
    table,
    with_interval,
)
from alambic.report.plots import RUN_COLORS, save_figure

TRAINING_DOMAIN = "held-out split"  # how the run's own held-out split is named beside the extra sets


def set_rows(models: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per model: perplexity, top-1 / top-5 agreement and KL to the teacher, each with its interval."""
    return [
        [
            model_label(name),
            with_interval(m, "perplexity", perplexity),
            with_interval(m, "top1_agreement", percent),
            with_interval(m, "top5_agreement", percent),
            with_interval(m, "kl_to_teacher", kl),
        ]
        for name, m in models.items()
    ]


def kept_by_set(evaluation: dict[str, Any], metric: str = "perplexity") -> dict[str, dict[str, float | None]]:
    """{set: {model: `metric` kept (teacher = 1)}}: the held-out split (eval.json's retention) first, then each set."""
    by_set = {TRAINING_DOMAIN: {n: r.get(metric) for n, r in (evaluation.get("retention") or {}).items()}}
    for name, s in (evaluation.get("datasets") or {}).items():
        by_set[name] = {n: r.get(metric) for n, r in (s.get("retention") or {}).items()}
    return by_set


def plot_retention_by_set(kept: dict[str, dict[str, float | None]], path: Path, *, label=str) -> Path | None:
    """Grouped bars: for each set (x), the perplexity each model (colour) keeps; the teacher's level drawn at 1.

    Returns `path`, or None when no model but the teacher has a figure."""
    import matplotlib.pyplot as plt  # after report.plots chose the Agg backend

    models = [m for m in dict.fromkeys(n for per in kept.values() for n in per) if m != "teacher"]
    if not models:
        return None
    sets = list(kept)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.6 * len(sets) + 1.5), 4.2))
    for i, (model, color) in enumerate(zip(models, RUN_COLORS * 4)):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(sets))]
        ys = [kept[s].get(model) or 0.0 for s in sets]
        bars = ax.bar(xs, ys, width=width * 0.95, color=color, label=label(model))
        ax.bar_label(bars, labels=[f"{y:.0%}" if y else "–" for y in ys], fontsize=7, padding=1)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="teacher")
    ax.set_xticks(range(len(sets)), sets, fontsize=9)
    ax.set_ylabel("perplexity kept (teacher ÷ model)", fontsize=9)
    ax.set_ylim(0, max(1.1, max((v or 0) for per in kept.values() for v in per.values()) * 1.12))
    # below the axes: bars reach the teacher's level, where a legend inside would hide them
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(4, len(models) + 1), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("how much of the teacher each model keeps, per held-out set", fontsize=10)
    return save_figure(fig, path)


def datasets_section(evaluation: dict[str, Any], run_dir: Path) -> list[str]:
    """Markdown lines: one table per extra held-out set, the retention table across sets and its plot ([]: none)."""
    sets = evaluation.get("datasets") or {}
    if not sets:
        return []
    lines = ["## Beyond the training data: extra held-out sets", ""]
    for name, s in sets.items():
        first = next(iter(s["models"].values()))
        overlap = s.get("overlap") or {}
        lines += [
            (
                f"### {name} ({s['source']}, {s['format']}: {first['num_tokens']} tokens in {s['sequences']} "
                f"sequences of {s['documents']} documents)"
            ),
            "",
            table(["model", "perplexity", "top-1 agree", "top-5 agree", "KL to teacher"], set_rows(s["models"])),
        ]
        if overlap.get("documents"):
            ids = ", ".join(overlap.get("ids") or [])
            lines += [
                "",
                f"**{overlap['documents']} of its documents are also training documents** (same text, e.g. "
                f"{ids}): "
                + (
                    "they were left out of the set."
                    if overlap["action"] == "drop"
                    else "flagged and scored with the rest, so this set is not wholly held out."
                ),
            ]
        lines.append("")
    kept = kept_by_set(evaluation)
    top1 = kept_by_set(evaluation, "top1_agreement")
    names = [n for n in dict.fromkeys(m for per in kept.values() for m in per) if n != "teacher"]

    def cell(per: dict[str, float | None], model: str) -> str:
        return percent(per[model]) if per.get(model) is not None else "–"

    rows = [[model_label(n), *(cell(kept[s], n) for s in kept), *(cell(top1[s], n) for s in top1)] for n in names]
    headers = ["model", *(f"{s}: perplexity kept" for s in kept), *(f"{s}: top-1 agree" for s in top1)]
    seconds = sum(s.get("seconds", 0) for s in sets.values())
    lines += [
        "### Retention across sets",
        "",
        table(headers, rows),
        "",
        (
            "Perplexity kept: teacher perplexity ÷ model perplexity on the same set (100 % = the teacher's); top-1 "
            "agree: share of positions where the model's most likely token is the teacher's. The held-out split is "
            "the training domain; a model that keeps much less on another set lost more there. Intervals: 95 % "
            f"bootstrap over each set's sequences. Scored in {seconds:.1f} s."
        ),
    ]
    path = plot_retention_by_set(kept, run_dir / "plots" / "retention_by_set.png", label=model_label)
    if path is not None:
        lines += ["", "![Perplexity kept per held-out set](plots/retention_by_set.png)"]
    return lines
