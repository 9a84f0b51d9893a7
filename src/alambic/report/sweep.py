"""The sweep report: every grid point's distilled student side by side, the best one named, KL plotted.

Written from the sweep folder's records only (`sweep.json`, each point's `eval.json`), as `sweep.md` and
the same content as a self-contained `sweep.html`, with `plots/sweep.png`. Each point keeps its own
report (report.md / report.html in its run folder), linked from the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from alambic.report.html import write_html_report
from alambic.report.markdown import kl, model_label, not_done_section, percent, perplexity, table, with_interval
from alambic.report.plots import RUN_COLORS, plt, save_figure  # plt with the Agg backend report.plots selects
from alambic.utils import atomic_write_text, console

QUALITY = (
    ("perplexity", "perplexity", perplexity),
    ("top-1 agree", "top1_agreement", percent),
    ("top-5 agree", "top5_agreement", percent),
    ("KL to teacher", "kl_to_teacher", kl),
)
REFERENCES = ("teacher", "student_before", "student_ce_control")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _value(value: Any) -> str:
    """A swept value as the user wrote it in YAML; `|` escaped, it would end the table cell."""
    text = json.dumps(value) if isinstance(value, bool) or value is None else str(value)
    return text.replace("|", "\\|")


def _interval(m: dict[str, Any], key: str) -> tuple[float, float] | None:
    low_high = (m.get("intervals") or {}).get(key)
    return (low_high[0], low_high[1]) if low_high else None


def _point_cell(point: dict[str, Any], sweep_dir: Path, best: bool) -> str:
    run = point["run_dir"]
    links = [
        f"[{label}]({run}/{file})"
        for label, file in (("md", "report.md"), ("html", "report.html"))
        if (sweep_dir / run / file).is_file()
    ]
    return f"{point['name']}" + (f" ({' · '.join(links)})" if links else "") + (" **best**" if best else "")


def _references(points: list[dict[str, Any]], evals: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Teacher, student before distillation and CE control: one row each when every point measured the same
    figures (a loss sweep), else one row per point (the data, the student or the training was swept)."""
    rows = []
    for name in REFERENCES:
        seen = [(p["name"], evals[p["name"]][name]) for p in points if name in evals[p["name"]]]
        distinct = {json.dumps([m.get(k) for _, k, _ in QUALITY]) for _, m in seen}
        for point, m in seen[:1] if len(distinct) == 1 else seen:
            label = model_label(name) + ("" if len(distinct) == 1 else f" ({point})")
            rows.append([label, *(with_interval(m, key, fmt) for _, key, fmt in QUALITY)])
    return rows


def _best_sentence(ranked: list[dict[str, Any]], evals: dict[str, dict[str, Any]], keys: list[str]) -> str:
    """Name the point with the lowest KL to the teacher and say whether the next best is told apart from it."""
    best, m = ranked[0], evals[ranked[0]["name"]]["student_distilled"]
    values = ", ".join(f"{k} = {_value(best['overrides'][k])}" for k in keys)
    text = (
        f"Best point (lowest KL to teacher): **{best['name']}** ({values}), KL {with_interval(m, 'kl_to_teacher', kl)}."
    )
    if len(ranked) > 1:
        second = ranked[1]
        m2 = evals[second["name"]]["student_distilled"]
        a, b = _interval(m, "kl_to_teacher"), _interval(m2, "kl_to_teacher")
        if a and b:
            verdict = (
                "its interval overlaps the next best's, so on this held-out set the two are not told apart"
                if a[1] >= b[0]
                else "it is ahead of the next best by more than their intervals"
            )
            text += f" Next: {second['name']} (KL {with_interval(m2, 'kl_to_teacher', kl)}); {verdict}."
        else:
            text += f" Next: {second['name']} (KL {kl(m2['kl_to_teacher'])})."
    control = evals[best["name"]].get("student_ce_control")
    if control and control.get("kl_to_teacher") is not None:
        text += (
            f" The same student trained with plain cross-entropy (CE control) reaches {kl(control['kl_to_teacher'])}."
        )
    return text


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_sweep(
    grid: dict[str, list[Any]],
    points: list[dict[str, Any]],
    evals: dict[str, dict[str, Any]],
    path: Path,
    *,
    best: str | None = None,
) -> Path | None:
    """KL to teacher (95 % interval as error bars) against each swept key, one panel per key and one line per
    combination of the other keys' values; the best point starred, the CE control dashed when it is one value.

    Returns:
        `path`, or None when no point has a distilled student's KL to plot.
    """
    done = [p for p in points if (evals[p["name"]].get("student_distilled") or {}).get("kl_to_teacher") is not None]
    if not done:
        return None
    keys = list(grid)
    controls = {
        evals[p["name"]]["student_ce_control"]["kl_to_teacher"]
        for p in done
        if "student_ce_control" in evals[p["name"]]
    }
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        others = [k for k in keys if k != key]
        numeric = _numeric(grid[key])
        x_of = (lambda v: v) if numeric else (lambda v, values=grid[key]: values.index(v))
        lines: dict[tuple, list[dict[str, Any]]] = {}
        for p in done:
            lines.setdefault(tuple(json.dumps(p["overrides"][o]) for o in others), []).append(p)
        for color, (combo, members) in zip(RUN_COLORS * (len(lines) // len(RUN_COLORS) + 1), lines.items()):
            members.sort(key=lambda p: grid[key].index(p["overrides"][key]))
            xs = [x_of(p["overrides"][key]) for p in members]
            ms = [evals[p["name"]]["student_distilled"] for p in members]
            ys = [m["kl_to_teacher"] for m in ms]
            bounds = [_interval(m, "kl_to_teacher") or (y, y) for m, y in zip(ms, ys)]
            yerr = [[y - lo for y, (lo, _) in zip(ys, bounds)], [hi - y for y, (_, hi) in zip(ys, bounds)]]
            label = ", ".join(f"{o.rsplit('.', 1)[-1]}={_value(p)}" for o, p in zip(others, map(json.loads, combo)))
            ax.errorbar(xs, ys, yerr=yerr, marker="o", ms=4, lw=1.4, capsize=3, color=color, label=label or None)
            for x, y, p in zip(xs, ys, members):
                if p["name"] == best:
                    ax.scatter([x], [y], marker="*", s=160, color="gold", edgecolors="black", zorder=4, label="best")
        if len(controls) == 1:
            ax.axhline(next(iter(controls)), color="gray", ls="--", lw=1, label="CE control")
        if numeric and min(grid[key]) > 0 and max(grid[key]) / min(grid[key]) >= 10:
            ax.set_xscale("log")  # learning rates and the like span decades
        ax.set_xticks(grid[key] if numeric else range(len(grid[key])), [_value(v) for v in grid[key]])
        ax.set_xlabel(key)
        ax.set_ylabel("KL(teacher ‖ student), held out")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("distilled student's KL to the teacher across the sweep (bars: 95 % interval)", fontsize=10)
    return save_figure(fig, path)


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """Write `sweep.md`, `sweep.html` (the same, self-contained) and `plots/sweep.png` into a sweep folder
    from its `sweep.json` and each point's `eval.json`; print the table. Returns the path of sweep.md.

    Raises:
        FileNotFoundError: `sweep_dir` holds no sweep.json.
    """
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "sweep.json").is_file():
        raise FileNotFoundError(
            f"{sweep_dir / 'sweep.json'} not found: not a sweep folder; run "
            "`alambic sweep CONFIG --set KEY=V1,V2` first"
        )
    record = json.loads((sweep_dir / "sweep.json").read_text())
    grid, points = record["grid"], record["points"]
    keys = list(grid)
    evals = {}
    for p in points:  # eval.json is the source of truth; sweep.json keeps a copy of the distilled student's
        models = _read_json(sweep_dir / p["run_dir"] / "eval.json").get("models", {})
        if not models and p.get("metrics"):
            models = {"student_distilled": p["metrics"]}
        evals[p["name"]] = models
    ranked = sorted(
        (p for p in points if (evals[p["name"]].get("student_distilled") or {}).get("kl_to_teacher") is not None),
        key=lambda p: evals[p["name"]]["student_distilled"]["kl_to_teacher"],
    )
    best = ranked[0]["name"] if ranked else None

    headers = ["point", *keys, *(h for h, _, _ in QUALITY), "distill s", "status"]
    rows = []
    for p in points:
        m = evals[p["name"]].get("student_distilled") or {}
        seconds = p.get("distill_seconds")
        rows.append(
            [
                _point_cell(p, sweep_dir, p["name"] == best),
                *(_value(p["overrides"][k]) for k in keys),
                *(with_interval(m, key, fmt) for _, key, fmt in QUALITY),
                "–" if seconds is None else f"{seconds:.0f}",
                p.get("status", ""),
            ]
        )
    fixed = record.get("fixed") or {}
    parts = [
        f"# alambic sweep: {sweep_dir.name}",
        "",
        f"{len(points)} points ({' × '.join(f'{len(v)} {k}' for k, v in grid.items())}) from `{record.get('config')}`"
        + (", every point with " + ", ".join(f"{k} = {_value(v)}" for k, v in fixed.items()) if fixed else "")
        + f"; {sum(p.get('status') == 'done' for p in points)} done.",
        "",
        "## Distilled student at each point (held-out data)",
        "",
        table(headers, rows),
        "",
        _best_sentence(ranked, evals, keys) if ranked else "No point has been evaluated yet: nothing to compare.",
        "",
        "Quality of the distilled student on the held-out split of each point's run (its report has the rest); "
        "[low, high]: 95 % bootstrap interval over the held-out sequences; distill s: training wall time.",
    ]
    refs = _references(points, evals)
    if refs:
        parts += ["", "## For reference", "", table(["model", *(h for h, _, _ in QUALITY)], refs)]
    if plot_sweep(grid, points, evals, sweep_dir / "plots" / "sweep.png", best=best) is not None:
        parts += ["", "![KL to teacher across the sweep](plots/sweep.png)"]
    parts += not_done_section(
        "Points not done",
        [(p["name"], p.get("status"), p.get("error")) for p in points if p.get("status") not in ("done", None)],
    )
    path = sweep_dir / "sweep.md"
    markdown = "\n".join(parts) + "\n"
    atomic_write_text(path, markdown)
    write_html_report(
        sweep_dir,
        markdown,
        title=f"alambic sweep: {sweep_dir.name}",
        filename="sweep.html",
        footer="Written by alambic from the sweep folder's records (sweep.json and each point's "
        "eval.json); the same content as sweep.md.",
    )

    # the terminal gets the gist (the point's name holds its values); sweep.md has every column and interval
    summary = Table(title=f"sweep {sweep_dir.name}: distilled student, held out")
    for h in ("point", "KL to teacher", "perplexity", "top-1 agree", "status"):
        summary.add_column(h, justify="left" if h == "point" else "right")
    for p in points:
        m = evals[p["name"]].get("student_distilled") or {}
        summary.add_row(
            p["name"] + (" (best)" if p["name"] == best else ""),
            with_interval(m, "kl_to_teacher", kl),
            *(
                fmt(m[key]) if m.get(key) is not None else "–"
                for key, fmt in (("perplexity", perplexity), ("top1_agreement", percent))
            ),
            p.get("status", ""),
        )
    console.print(summary)
    console.print(f"sweep report: {path} and sweep.html", markup=False)
    return path
