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
