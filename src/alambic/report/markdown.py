"""Markdown pieces every report section shares: tables and the number formats of the quality metrics."""

from __future__ import annotations


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def perplexity(value: float) -> str:
    # a pruned, untrained student can sit at 1e6: scientific notation rather than a 10-digit column
    return f"{value:.2f}" if value < 1e5 else f"{value:.3g}"


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def kl(value: float) -> str:
    return f"{value:.3f}"


MODEL_LABELS = {
    "teacher": "teacher",
    "student_before": "student before",
    "student_distilled": "student distilled",
    "student_ce_control": "student CE control",
}


def model_label(name: str) -> str:
    """How a model of eval.json is named in reports; baselines keep the name the config gave them."""
    return MODEL_LABELS.get(name, name)


def mib(value: float | None) -> str:
    return "–" if value is None else f"{value / 2**20:.0f} MiB"


def human_bytes(value: float | None) -> str:
    """Bytes in the binary unit that keeps 3 significant figures ("805 MiB", "3.50 GiB"); None (not measured) -> –."""
    if value is None:
        return "–"
    if value < 1024:
        return f"{value:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    decimals = 2 if value < 10 else 1 if value < 100 else 0
    return f"{value:.{decimals}f} {unit}"


def with_interval(m: dict, key: str, fmt) -> str:
    """`value [low, high]` with the bootstrap interval where eval.json has one; a point interval (the
    teacher against itself) is left out, and so is a metric an older eval.json lacks."""
    if m.get(key) is None:
        return "–"
    low_high = (m.get("intervals") or {}).get(key)
    if not low_high or low_high[0] == low_high[1]:
        return fmt(m[key])
    return f"{fmt(m[key])} [{fmt(low_high[0])}, {fmt(low_high[1])}]"


def not_done_section(title: str, entries: list[tuple[str, str | None, str | None]]) -> list[str]:
    """Markdown lines listing runs that did not finish: `(name, status, error)` each, with the first line of the
    error in a code span (a backtick inside would end it early, so it becomes a quote). [] when there are none."""
    if not entries:
        return []
    return [
        "",
        f"## {title}",
        "",
        *(
            f"- {name}: {status}" + (f": `{error.splitlines()[0].replace('`', chr(39))}`" if error else "")
            for name, status, error in entries
        ),
    ]
