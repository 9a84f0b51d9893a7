"""The run report as one self-contained HTML file: the report's markdown rendered, figures inlined.

The HTML is rendered from the very markdown written to report.md, so the two never disagree. Every
figure becomes a base64 `data:` URI and the style sheet is inline: the file can be mailed, archived
or opened offline, and loads nothing from the network.
"""

from __future__ import annotations

import base64
import html
import mimetypes
from pathlib import Path

from markdown_it import MarkdownIt

from alambic.utils import atomic_write_text

STYLE = """
body { font: 15px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; color: #1a202c;
       background: #fff; max-width: 1100px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.6em; border-bottom: 2px solid #2b6cb0; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; color: #2b6cb0; border-bottom: 1px solid #e2e8f0; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #cbd5e0; padding: .35em .7em; }
th { background: #edf2f7; text-align: left; }
td { font-variant-numeric: tabular-nums; }
td:not(:first-child) { text-align: right; white-space: nowrap; }
tbody tr:nth-child(even) { background: #f7fafc; }
code { background: #edf2f7; padding: .1em .3em; border-radius: 3px; font-size: .9em; }
img { max-width: 100%; height: auto; display: block; margin: 1em 0; border: 1px solid #e2e8f0; }
.missing { color: #c53030; font-style: italic; }
footer { margin-top: 3em; color: #718096; font-size: .85em; }
"""


def _data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def markdown_to_html(markdown: str, base_dir: Path) -> str:
    """The HTML body of `markdown` (CommonMark + tables), its images read from `base_dir` and inlined.

    An image that is not a file under `base_dir` (missing, or a remote address) is replaced by its alt
    text, flagged: the page must never reach out to the network to show itself.
    """
    md = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable("table")
    base_dir = base_dir.resolve()

    def image(self, tokens, idx, options, env) -> str:
        token = tokens[idx]
        src = str(token.attrGet("src") or "")
        alt = self.renderInlineAsText(token.children or [], options, env)
        path = (base_dir / src).resolve()
        if "://" in src or not path.is_relative_to(base_dir) or not path.is_file():
            return f'<span class="missing">[figure not found: {html.escape(alt)} ({html.escape(src)})]</span>'
        token.attrSet("src", _data_uri(path))
        token.attrSet("alt", alt)
        return self.renderToken(tokens, idx, options, env)

    md.add_render_rule("image", image)
    return md.render(markdown)


RUN_FOOTER = (
    "Written by alambic from the run folder's records (eval.json, metrics.jsonl, config.yaml, "
    "manifest.json); the same content as report.md."
)


def write_html_report(
    folder: Path, markdown: str, *, title: str, filename: str = "report.html", footer: str = RUN_FOOTER
) -> Path:
    """Write `folder/filename`: `markdown` (the text of the .md next to it) rendered, its figures inlined."""
    body = markdown_to_html(markdown, folder)
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}"
        f"<footer>{html.escape(footer)}</footer>\n</body>\n</html>\n"
    )
    path = folder / filename
    atomic_write_text(path, page)
    return path
