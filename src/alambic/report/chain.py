"""The chain report: each step's distilled student side by side, against its own teacher and the original one.

Written from the chain folder's records only (`chain.json`, `chain_eval.json`, each step's `eval.json`), as
`chain.md` and the same content as a self-contained `chain.html`. Each step keeps its own report (report.md /
report.html in its run folder), linked from the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from alambic.report.html import write_html_report
from alambic.report.markdown import kl, not_done_section, percent, perplexity, table, with_interval
from alambic.utils import atomic_write_text, console

HEADERS = [
    "step",
    "teacher",
    "student starts from",
    "parameters",
    "perplexity",
    "top-1 agree (original)",
    "KL to original teacher",
    "KL to its teacher",
    "distill s",
    "status",
]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")  # a `|` would end the table cell


def _step_cell(step: dict[str, Any], folder: Path) -> str:
    run = step["run_dir"]
    links = [
        f"[{label}]({run}/{file})"
        for label, file in (("md", "report.md"), ("html", "report.html"))
        if (folder / run / file).is_file()
    ]
    return _cell(step["name"]) + (f" ({' · '.join(links)})" if links else "")


def _millions(value: Any) -> str:
    return "–" if value is None else f"{value / 1e6:.2f}M"


def chain_rows(folder: str | Path) -> list[dict[str, Any]]:
    """One row per step, in chain order: its record in chain.json, its figures against the original teacher
    (chain_eval.json) under "original" and its own evaluation's distilled student (eval.json) under "own"."""
    folder = Path(folder)
    record = _read_json(folder / "chain.json")
    compared = _read_json(folder / "chain_eval.json").get("steps", {})
    rows = []
    for step in record.get("steps", []):
        own = _read_json(folder / step["run_dir"] / "eval.json").get("models", {}).get("student_distilled") or {}
        rows.append({**step, "original": compared.get(step["name"]) or {}, "own": own})
    return rows


def write_chain_report(folder: str | Path) -> Path:
    """Write `chain.md` and `chain.html` (the same, self-contained) into a chain folder from its records; print the
    table. Returns the path of chain.md.

    Raises:
        FileNotFoundError: `folder` holds no chain.json.
    """
    folder = Path(folder)
    if not (folder / "chain.json").is_file():
        raise FileNotFoundError(
            f"{folder / 'chain.json'} not found: not a chain folder; run a config with a `chain` "
            "first (`alambic run CONFIG`)"
        )
    record = _read_json(folder / "chain.json")
    comparison = _read_json(folder / "chain_eval.json")
    rows = chain_rows(folder)
    first = rows[0]["name"] if rows else "?"
    body = []
    for row in rows:
        original, own = row["original"], row["own"]
        seconds = row.get("distill_seconds")
        body.append(
            [
                _step_cell(row, folder),
                _cell(row["teacher"]),
                _cell(row["student"]),
                _millions(original.get("parameters", own.get("parameters"))),
                with_interval(original, "perplexity", perplexity),
                with_interval(original, "top1_agreement", percent),
                with_interval(original, "kl_to_teacher", kl),
                with_interval(own, "kl_to_teacher", kl),
                "–" if seconds is None else f"{seconds:.0f}",
                _cell(row.get("status", "")),
            ]
        )
    teacher = comparison.get("teacher") or {}
    parts = [
        f"# alambic chain: {record.get('name', folder.name)}",
        "",
        (
            f"{len(rows)} steps, run in order; {sum(r.get('status') == 'done' for r in rows)} done. "
            "Each step is an ordinary run folder with its own report."
        ),
        "",
        "## Each step's distilled student",
        "",
        table(HEADERS, body),
        "",
        (
            "Perplexity, top-1 agreement and KL to the original teacher: every step's final student scored against "
            f"the teacher of the first step ({first}) on {first}'s held-out split, the same sequences for all. KL to "
            "its teacher: the step's own evaluation, against the teacher it learnt from, on its own held-out split. "
            "[low, high]: 95 % bootstrap interval over the held-out sequences; distill s: training wall time."
        ),
    ]
    if comparison.get("skipped"):
        parts += ["", f"Not compared against the original teacher: {comparison['skipped']}."]
    elif teacher:
        parts += [
            "",
            (
                f"Original teacher: {_millions(teacher.get('parameters'))} parameters, perplexity "
                f"{with_interval(teacher, 'perplexity', perplexity)} on the same split."
            ),
        ]
    scored = [r for r in rows if r["original"].get("kl_to_teacher") is not None]
    if scored:
        best = min(scored, key=lambda r: r["original"]["kl_to_teacher"])
        parts += [
            "",
            (
                f"Closest to the original teacher: **{_cell(best['name'])}** (KL "
                f"{with_interval(best['original'], 'kl_to_teacher', kl)})."
            ),
        ]
    parts += not_done_section(
        "Steps not done",
        [
            (_cell(r["name"]), r.get("status"), r.get("error"))
            for r in rows
            if r.get("status") not in ("done", "pending", None)
        ],
    )
    path = folder / "chain.md"
    markdown = "\n".join(parts) + "\n"
    atomic_write_text(path, markdown)
    write_html_report(
        folder,
        markdown,
        title=f"alambic chain: {record.get('name', folder.name)}",
        filename="chain.html",
        footer="Written by alambic from the chain folder's records (chain.json, chain_eval.json and each "
        "step's eval.json); the same content as chain.md.",
    )

    summary = Table(title=f"chain {record.get('name', folder.name)}: distilled students, held out")
    for h in ("step", "teacher", "KL to original", "KL to its teacher", "perplexity", "status"):
        summary.add_column(h, justify="left" if h in ("step", "teacher") else "right")
    for row in rows:
        summary.add_row(
            row["name"],
            row["teacher"],
            with_interval(row["original"], "kl_to_teacher", kl),
            with_interval(row["own"], "kl_to_teacher", kl),
            with_interval(row["original"], "perplexity", perplexity),
            row.get("status", ""),
        )
    console.print(summary)
    console.print(f"chain report: {path} and chain.html", markup=False)
    return path
