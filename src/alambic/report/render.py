"""The run report: what was distilled, how, and how much of the teacher the student kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from alambic.layout import (
    CONFIG_FILE,
    CONTROL_DIR,
    EVAL_FILE,
    GENERATIONS_DIR,
    MANIFEST_FILE,
    METRICS_FILE,
    PLOTS_DIR,
    PRUNING_FILE,
    REPORT_FILE,
    REPORT_HTML_FILE,
    SELECTION_DIR,
    SELECTION_FILE,
    STUDENT_DIR,
    STUDENT_FILE,
    SUMMARY_FILE,
    TRAIN_SUMMARY_FILE,
)
from alambic.report.advice import advice
from alambic.report.classification import classification_rows, classification_section, is_classification
from alambic.report.cost import cost_section, generation_section, retention_section
from alambic.report.datasets import datasets_section
from alambic.report.html import write_html_report
from alambic.report.lm_eval import lm_eval_section
from alambic.report.markdown import kl, model_label, percent, perplexity, table, with_interval
from alambic.report.plots import plot_training_curves, read_metrics
from alambic.report.pruning import pruning_section
from alambic.report.spec import architecture_section, loss_section, stages_section, training_section
from alambic.utils import atomic_write_text, console


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def summary_rows(evaluation: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and one row per model: size, quality against the teacher, and (when measured) speed."""
    models = evaluation.get("models", {})
    ret = evaluation.get("retention") or {}
    timed = any(m.get("cost") for m in models.values())
    rows = []
    for name, m in models.items():
        row = [
            model_label(name),
            f"{m['parameters'] / 1e6:.1f}M",
            str(m.get("num_layers", "")),
            with_interval(m, "perplexity", perplexity),
            with_interval(m, "top1_agreement", percent),
            with_interval(m, "top5_agreement", percent),
            with_interval(m, "kl_to_teacher", kl),
        ]
        if timed:
            latency = (m.get("cost") or {}).get("latency_per_token_seconds")
            speedup = (ret.get(name) or {}).get("speedup")
            row += [f"{latency['median'] * 1e3:.1f}" if latency else "–", f"{speedup:.2f}×" if speedup else "–"]
        rows.append(row)
    return HEADERS + (["ms / token", "speed-up"] if timed else []), rows


HEADERS = ["model", "params", "layers", "perplexity", "top-1 agree", "top-5 agree", "KL to teacher"]


def _width_pruned(student: dict[str, Any]) -> bool:
    t, s = student.get("teacher_shape", {}), student.get("student_shape", {})
    return any(t.get(k) != s.get(k) for k in t if k != "num_layers")


def training_data_section(run_dir: Path) -> list[str]:
    """Markdown lines on what distill trained on, when not the corpus as it is: the teacher's responses
    (generations/summary.json) and the teacher-entropy selection (selection/selection.json, with its histogram)."""
    generated = _read_json(run_dir / GENERATIONS_DIR / SUMMARY_FILE)
    selection = _read_json(run_dir / SELECTION_DIR / SELECTION_FILE)
    if not generated and not selection:
        return []
    lines = ["## Training data", ""]
    if generated:
        s, flagged = generated["settings"], ", ".join(f"{k} {v}" for k, v in generated["flagged"].items() if v)
        lines.append(
            f"- Teacher responses: {generated['responses']} to {generated['prompts']} training prompts (temperature "
            f"{s['temperature']}, top-p {s['top_p']}, top-k {s['top_k']}, at most {s['max_new_tokens']} new tokens); "
            f"{generated['degenerate']} flagged degenerate"
            + (f" ({flagged})" if flagged else "")
            + (", left out" if s["filter_degenerate"] else ", kept")
            + f"; {generated['training_sequences']} "
            f"training sequences, {generated['counted_tokens']} response tokens counted."
            + (" The CE control trains on the corpus answers." if (run_dir / CONTROL_DIR).is_dir() else "")
        )
    if selection:
        lo, hi = selection["kept_range"]
        lines.append(
            f"- Teacher-entropy selection: kept {selection['kept']} of {selection['total']} training sequences, the "
            f"{selection['band']} {selection['keep_fraction']:.0%} (mean token entropy {lo:.3f}–{hi:.3f} nats; "
            f"median of all {selection['quantiles']['0.5']:.3f})."
        )
        from alambic.report.selection import plot_entropy_histogram

        if plot_entropy_histogram(selection, run_dir / PLOTS_DIR / "selection_entropy.png") is not None:
            lines += ["", "![Teacher entropy of the training sequences](plots/selection_entropy.png)"]
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Write `report.md` and `report.html` (the same, self-contained) into the run folder from eval.json,
    config.yaml, metrics.jsonl and the manifest; print its table. Returns the path of report.md."""
    run_dir = Path(run_dir)
    evaluation = _read_json(run_dir / EVAL_FILE)
    manifest = _read_json(run_dir / MANIFEST_FILE).get("stages", {})
    config = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) if (run_dir / CONFIG_FILE).is_file() else {}
    student = _read_json(run_dir / STUDENT_DIR / STUDENT_FILE)
    train = _read_json(run_dir / TRAIN_SUMMARY_FILE)
    control = _read_json(run_dir / CONTROL_DIR / TRAIN_SUMMARY_FILE)
    first = next(iter(evaluation.get("models", {}).values()), {})
    n_tokens, n_sequences = first.get("num_tokens", 0), first.get("num_sequences")
    # task sequence_classification: accuracy and macro-F1 replace the next-token metrics, advice and cost sections
    classifier = is_classification(evaluation)

    headers, rows = classification_rows(evaluation) if classifier else summary_rows(evaluation)
    metrics = read_metrics(run_dir / METRICS_FILE)
    pruning = _read_json(run_dir / STUDENT_DIR / PRUNING_FILE)
    tips = [] if classifier else advice(evaluation, config, pruning=pruning or None, metrics=metrics)
    parts = [
        f"# alambic report: {config.get('name', run_dir.name)}",
        "",
        f"Teacher `{config.get('teacher', {}).get('model')}`; student: "
        + (
            f"{len(student['kept_layers'])} of {student['teacher_layers']} teacher layers {student['kept_layers']}"
            if "kept_layers" in student
            else f"`{student.get('source')}`"
        )
        + ("; width pruned (see Pruning)" if _width_pruned(student) else ""),
    ]
    if classifier:
        parts += ["", *classification_section(evaluation, run_dir)]
    else:
        parts += [
            "",
            f"## Quality on held-out data ({n_tokens} tokens"
            + (f" in {n_sequences} sequences" if n_sequences else "")
            + " never trained on)",
            "",
            table(headers, rows),
            "",
            "Perplexity of the held-out text; top-1 agree: share of positions where the model's most likely next "
            "token is the teacher's; top-5 agree: share where the teacher's most likely token is among the model's "
            "five most likely; KL to teacher: mean KL(teacher‖model) per token at T = 1. The CE control is "
            "the same student trained on the same data for the same steps with plain cross-entropy."
            + (
                " [low, high]: 95 % bootstrap interval over the held-out sequences (whole sequences resampled, "
                "the same resamples for every model)."
                if "intervals" in first
                else ""
            ),
        ]
        teacher = evaluation.get("models", {}).get("teacher", {})
        if "own_tokens" in teacher:  # a student with its own tokenizer (data.cross)
            parts += [
                "",
                f"The student has its own tokenizer: the teacher read the same texts in its own "
                f"{teacher['own_tokens']} tokens, and its perplexity is its summed cross-entropy over them per "
                "student token, comparable with the students'. Agreement and KL need one vocabulary: the "
                "student learnt from the teacher by "
                + (
                    "ULD (sorted probability vectors, where the two tokenizations line up)"
                    if config.get("loss", {}).get("divergence") == "uld"
                    else "its generated responses"
                )
                + "; responses to held-out prompts (chat data) compare them "
                "tokenizer-free.",
            ]
    if tips:
        parts += ["", "## Advice", "", *(f"- {tip}" for tip in tips)]
    lm_sections = (
        []
        if classifier
        else [
            generation_section(evaluation),
            datasets_section(evaluation, run_dir),
            lm_eval_section(evaluation),
            cost_section(evaluation),
            retention_section(evaluation, run_dir),
        ]
    )
    for section in (*lm_sections, architecture_section(evaluation), loss_section(config)):
        if section:
            parts += ["", *section]
    hardware = next(
        (m["cost"].get("device_name") for m in evaluation.get("models", {}).values() if m.get("cost")), None
    )
    parts += ["", *training_section(config, train, control, hardware)]
    if data_lines := training_data_section(run_dir):
        parts += ["", *data_lines]
    # The control trains into control/, so its log is control/metrics.jsonl.
    curves = plot_training_curves(
        {"distilled student": metrics, "CE control": read_metrics(run_dir / CONTROL_DIR / METRICS_FILE)},
        run_dir / PLOTS_DIR / "training_curves.png",
    )
    if curves is not None:
        parts += ["", "![Training curves](plots/training_curves.png)"]
    if pruning and not classifier:  # its quality rows are next-token metrics
        parts += ["", *pruning_section(pruning, evaluation, run_dir)]
    if manifest:
        parts += ["", *stages_section(manifest)]
    path = run_dir / REPORT_FILE
    markdown = "\n".join(parts) + "\n"
    atomic_write_text(path, markdown)
    html_path = write_html_report(
        run_dir, markdown, title=f"alambic report: {config.get('name', run_dir.name)}", filename=REPORT_HTML_FILE
    )

    summary = Table(
        title=f"held-out classification ({first.get('num_examples')} examples)"
        if classifier
        else f"held-out quality ({n_tokens} tokens)"
    )
    for h in headers:
        summary.add_column(h, justify="left" if h == "model" else "right")
    for r in rows:
        summary.add_row(*r)
    console.print(summary)
    console.print(f"report: {path} and {html_path.name}", markup=False)
    return path
