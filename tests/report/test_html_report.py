"""report.md and report.html from a fake run folder: intervals, curves, pruning, and an HTML that needs no network."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

from alambic.report.html import markdown_to_html
from alambic.report.plots import _series, plot_training_curves, read_metrics
from alambic.report.render import write_report


class _Page(HTMLParser):
    """Tables as lists of rows of cell texts, image sources, and every attribute value."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[dict[str, str]] = []
        self.attributes: list[str] = []
        self.tags: set[str] = set()
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attributes += [v or "" for _, v in attrs]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _rows(page: _Page, header: str) -> dict[str, list[str]]:
    """The table whose header row has `header`, as {first cell: row}."""
    table = next(t for t in page.tables if header in t[0])
    return {row[0]: row for row in table}


def test_markdown_shows_intervals_top5_curves_pruning_and_stages(fake_run):
    run = fake_run()
    text = write_report(run).read_text()
    assert "| model | params | layers | perplexity | top-1 agree | top-5 agree | KL to teacher |" in text
    assert (
        "| student distilled | 81.4M | 15 | 71.11 [68.98, 73.24] | 50.4% [49.4%, 51.4%] | 78.0% [77.0%, 79.0%] "
        "| 0.974 [0.925, 1.023] |" in text
    )
    # the teacher against itself: a point interval says nothing, so it is left out
    assert "| teacher | 134.5M | 30 | 36.90 [35.79, 38.01] | 100.0% | 100.0% | 0.000 |" in text
    assert "16320 tokens in 64 sequences" in text and "95 % bootstrap interval" in text
    assert "![Training curves](plots/training_curves.png)" in text
    assert (run / "plots" / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Pruning" in text and "(plots/layer_importance.png)" in text and "## Stages" in text


def test_html_is_self_contained_with_the_same_tables_and_every_figure_inlined(fake_run):
    run = fake_run()
    write_report(run)
    html_text = (run / "report.html").read_text()
    page = _Page(html_text)
    assert not re.search(r"https?:", html_text, re.IGNORECASE)  # nothing to fetch, no link out
    assert "script" not in page.tags and "link" not in page.tags
    sources = [img["src"] for img in page.images]
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    inlined = {base64.b64decode(s.split(",", 1)[1]) for s in sources}
    assert inlined == {
        (run / "plots" / n).read_bytes()
        for n in ("training_curves.png", "layer_importance.png", "head_importance.png", "pareto.png")
    }
    assert {img["alt"] for img in page.images} == {
        "Training curves",
        "Layer importance",
        "Head importance",
        "Quality kept against cost saved",
    }
    quality = _rows(page, "top-5 agree")
    assert quality["student distilled"][3:] == [
        "71.11 [68.98, 73.24]",
        "50.4% [49.4%, 51.4%]",
        "78.0% [77.0%, 79.0%]",
        "0.974 [0.925, 1.023]",
        "11.0",
        "1.82×",
    ]
    assert set(quality) == {"model", "teacher", "student before", "student distilled", "student CE control"}
    assert _rows(page, "student")["decoder layers"] == ["decoder layers", "4", "2"]  # pruning: shapes
    assert _rows(page, "stage")["distill"] == ["distill", "done", "789.1"]
    # cost: median [min–max] of the repeats; retention against the teacher; both architectures side by side
    assert _rows(page, "latency / token")["student distilled"][6:] == [
        "33.0 ms [32.3–34.0]",
        "11.0 ms [10.8–11.3]",
        "364",
    ]
    assert _rows(page, "speed-up (latency)")["student distilled"] == [
        "student distilled",
        "51.9%",
        "50.4%",
        "1.82×",
        "1.82×",
        "1.65×",
        "1.56×",
    ]
    arch = _rows(page, "teacher")
    assert arch["decoder layers"] == ["decoder layers", "30", "15"]
    assert arch["compression (teacher ÷ model params)"][1:] == ["1.00×", "1.65×"]
    # quality; advice none; cost; retention; architecture; pruning: shapes, sizes, quality after pruning; stages
    assert len(page.tables) == 8
    assert "<style>" in html_text and "cross-entropy control: 60 steps in 500 s" in html_text


def test_older_eval_json_without_intervals_or_top5_still_renders(fake_run):
    run = fake_run(intervals=False, control=False, pruning=False, cost=False)
    for key in ("top5_agreement", "num_sequences"):
        text = (run / "eval.json").read_text().replace(f'"{key}"', f'"old_{key}"')
        (run / "eval.json").write_text(text)
    text = write_report(run).read_text()
    assert "| student distilled | 81.4M | 15 | 71.11 | 50.4% | – | 0.974 |" in text
    assert "bootstrap" not in text and "## Pruning" not in text and "(16320 tokens never trained on)" in text
    assert len(_Page((run / "report.html").read_text()).images) == 1  # the training curves only


def test_metrics_log_resumed_or_cut_off_reads_cleanly(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 5, "loss": 2.0}\n{"step": 10, "loss": 1.5}\n{"step": 10, "loss": 1.4}\n'
        '{"step": 15, "loss": 1.2}\n{"step": 2'
    )
    records = read_metrics(path)
    assert len(records) == 4  # the half-written last line is dropped
    assert _series(records, "loss") == ([5, 10, 15], [2.0, 1.4, 1.2])  # after a resume, the later record wins
    assert read_metrics(tmp_path / "absent.jsonl") == []
    assert plot_training_curves({"distilled": [], "control": []}, tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()


def test_images_that_are_not_local_files_are_never_linked(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.png").write_bytes(b"\x89PNG fake")
    body = markdown_to_html(
        "![here](plots/a.png)\n\n![gone](plots/missing.png)\n\n![web](https://x.org/a.png)\n\n"
        "![outside](../secret.png)\n\n<script>alert(1)</script>",
        tmp_path,
    )
    page = _Page(body)
    assert [img["src"] for img in page.images] == [
        "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    ]
    assert body.count("figure not found") == 3 and "script" not in page.tags  # raw HTML is escaped


def test_prompt_data_gets_a_responses_section_with_intervals_and_an_example(fake_run):
    run = fake_run(generation=True)
    text = write_report(run).read_text()
    assert "## Responses to held-out prompts (32 prompts never trained on)" in text
    assert (
        "| student distilled | 0.300 [0.250, 0.350] | 0.075 [0.000, 0.150] | 0.500 [0.450, 0.550] | 20.5 | 12.5% |"
    ) in text
    assert "| teacher | 0.400 [0.350, 0.450] | 0.100 [0.000, 0.200] | – |" in text
    assert "> **student distilled** AI is artificial intelligence." in text
    retained = _rows(_Page((run / "report.html").read_text()), "ROUGE-L kept")["student distilled"]
    assert retained[3] == "75.0%"  # 0.30 / 0.40 of the teacher's ROUGE-L against the references


def test_timings_of_a_busy_machine_are_flagged_not_silently_compared(fake_run):
    run = fake_run()
    assert "Timings disturbed" not in write_report(run).read_text()  # repeats within 5 %
    evaluation = json.loads((run / "eval.json").read_text())
    cost = evaluation["models"]["student_distilled"]["cost"]
    cost["latency_per_token_seconds"]["spread"], cost["load_average_1min"] = 3.4, 4.8
    (run / "eval.json").write_text(json.dumps(evaluation))
    text = " ".join(write_report(run).read_text().split())
    assert (
        "Timings disturbed: the repeats of student distilled (spread up to 340%, load average 4.8)".replace(
            "Timings disturbed:", "**Timings disturbed:**"
        )
        in text
    )
    assert "teacher (spread" not in text
