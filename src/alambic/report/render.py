"""The run report: what was distilled, how, and how much of the teacher the student kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from alambic.report.html import write_html_report
from alambic.report.markdown import kl, percent, perplexity, table
from alambic.report.plots import plot_training_curves, read_metrics
from alambic.report.pruning import pruning_section
from alambic.utils import atomic_write_text, console

MODEL_LABELS = {
    "teacher": "teacher",
    "student_before": "student before",
    "student_distilled": "student distilled",
    "student_ce_control": "student CE control",
}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _cell(m: dict[str, Any], key: str, fmt) -> str:
    """`value [low, high]` with the bootstrap interval where eval.json has one; a point interval (the
    teacher against itself) is left out, and so is a metric an older eval.json lacks."""
    if m.get(key) is None:
        return "–"
    low_high = (m.get("intervals") or {}).get(key)
    if not low_high or low_high[0] == low_high[1]:
        return fmt(m[key])
    return f"{fmt(m[key])} [{fmt(low_high[0])}, {fmt(low_high[1])}]"


def summary_rows(evaluation: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, m in evaluation.get("models", {}).items():
        rows.append([
            MODEL_LABELS.get(name, name),
            f"{m['parameters'] / 1e6:.1f}M",
            str(m.get("num_layers", "")),
            _cell(m, "perplexity", perplexity),
            _cell(m, "top1_agreement", percent),
            _cell(m, "top5_agreement", percent),
            _cell(m, "kl_to_teacher", kl),
        ])
    return rows


HEADERS = ["model", "params", "layers", "perplexity", "top-1 agree", "top-5 agree", "KL to teacher"]


def _width_pruned(student: dict[str, Any]) -> bool:
    t, s = student.get("teacher_shape", {}), student.get("student_shape", {})
    return any(t.get(k) != s.get(k) for k in t if k != "num_layers")


def write_report(run_dir: str | Path) -> Path:
    """Write `report.md` and `report.html` (the same, self-contained) into the run folder from eval.json,
    config.yaml, metrics.jsonl and the manifest; print its table. Returns the path of report.md."""
    run_dir = Path(run_dir)
    evaluation = _read_json(run_dir / "eval.json")
    manifest = _read_json(run_dir / "manifest.json").get("stages", {})
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    student = _read_json(run_dir / "student" / "student.json")
    train = _read_json(run_dir / "train_summary.json")
    control = _read_json(run_dir / "control" / "train_summary.json")
    first = next(iter(evaluation.get("models", {}).values()), {})
    n_tokens, n_sequences = first.get("num_tokens", 0), first.get("num_sequences")

    rows = summary_rows(evaluation)
    loss = config.get("loss", {})
    training = config.get("training", {})
    parts = [
        f"# alambic report: {config.get('name', run_dir.name)}",
        "",
        f"Teacher `{config.get('teacher', {}).get('model')}`; student: "
        + (f"{len(student['kept_layers'])} of {student['teacher_layers']} teacher layers {student['kept_layers']}"
           if "kept_layers" in student else f"`{student.get('source')}`")
        + ("; width pruned (see Pruning)" if _width_pruned(student) else ""),
        "",
        f"## Quality on held-out data ({n_tokens} tokens"
        + (f" in {n_sequences} sequences" if n_sequences else "") + " never trained on)",
        "",
        table(HEADERS, rows),
        "",
        "Perplexity of the held-out text; top-1 agree: share of positions where the model's most likely next "
        "token is the teacher's; top-5 agree: share where the teacher's most likely token is among the model's "
        "five most likely; KL to teacher: mean KL(teacher‖model) per token at T = 1. The CE control is "
        "the same student trained on the same data for the same steps with plain cross-entropy."
        + (" [low, high]: 95 % bootstrap interval over the held-out sequences (whole sequences resampled, "
           "the same resamples for every model)." if "intervals" in first else ""),
        "",
        "## Loss",
        "",
        f"total = {loss.get('alpha')} · T² · {loss.get('divergence')}(T = {loss.get('temperature')}) "
        f"+ {1 - float(loss.get('alpha', 0)):.2g} · cross-entropy"
        + (f"; JSD β = {loss.get('jsd_beta')}" if loss.get("divergence") == "jsd" else "")
        + (f"; skew = {loss.get('skew')}" if str(loss.get("divergence", "")).startswith("skew") else ""),
        "",
        "## Training",
        "",
        f"- data: {config.get('data', {}).get('source')} ({config.get('data', {}).get('format')}), "
        f"sequences of {config.get('data', {}).get('max_seq_len')} tokens",
        f"- {training.get('max_steps')} steps × {training.get('per_device_train_batch_size')} sequences × "
        f"{training.get('gradient_accumulation_steps')} accumulation, lr {training.get('learning_rate')} "
        f"({training.get('lr_scheduler_type')}, warm-up {training.get('warmup_ratio')})",
    ]
    if train:
        parts.append(f"- distillation: {train['global_step']} steps in {train['train_seconds']:.0f} s on "
                     f"{train['device']} ({train['torch_threads']} threads)")
    if control:
        parts.append(f"- cross-entropy control: {control['global_step']} steps in {control['train_seconds']:.0f} s")
    # The control trains into control/, so its log is control/metrics.jsonl.
    curves = plot_training_curves({"distilled student": read_metrics(run_dir / "metrics.jsonl"),
                                   "CE control": read_metrics(run_dir / "control" / "metrics.jsonl")},
                                  run_dir / "plots" / "training_curves.png")
    if curves is not None:
        parts += ["", "![Training curves](plots/training_curves.png)"]
    pruning = _read_json(run_dir / "student" / "pruning.json")
    if pruning:
        parts += ["", *pruning_section(pruning, evaluation, run_dir)]
    if manifest:
        total = sum(e.get("seconds", 0) or 0 for e in manifest.values())
        parts += ["", f"## Stages ({total / 60:.1f} min in all)", "", table(
            ["stage", "status", "seconds"],
            [[name, e.get("status", ""), f"{e.get('seconds', 0):.1f}"] for name, e in manifest.items()
             if name != "report"],
        )]
    path = run_dir / "report.md"
    markdown = "\n".join(parts) + "\n"
    atomic_write_text(path, markdown)
    html_path = write_html_report(run_dir, markdown, title=f"alambic report: {config.get('name', run_dir.name)}")

    summary = Table(title=f"held-out quality ({n_tokens} tokens)")
    for h in HEADERS:
        summary.add_column(h, justify="left" if h == "model" else "right")
    for r in rows:
        summary.add_row(*r)
    console.print(summary)
    console.print(f"report: {path} and {html_path.name}")
    return path
