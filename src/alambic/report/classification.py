"""The classification sections of the run report, from `eval.json` of a `task: sequence_classification` run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alambic.layout import TEACHER_DIR, TRAIN_SUMMARY_FILE
from alambic.report.markdown import kl, mib, model_label, percent, table, with_interval


def is_classification(evaluation: dict[str, Any]) -> bool:
    return evaluation.get("task") == "sequence_classification"


def classification_rows(evaluation: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and one row per model: size, accuracy and macro-F1 (with intervals), agreement with the teacher,
    KL to it, accuracy kept (model ÷ teacher) and, when measured, forward time and speed-up."""
    models = evaluation.get("models", {})
    ret = evaluation.get("retention") or {}
    timed = any(m.get("cost") for m in models.values())
    headers = [
        "model",
        "params",
        "layers",
        "accuracy",
        "macro-F1",
        "agrees with teacher",
        "KL to teacher",
        "accuracy kept",
    ] + (["ms / batch", "speed-up"] if timed else [])
    rows = []
    for name, m in models.items():
        kept = (ret.get(name) or {}).get("accuracy")
        row = [
            model_label(name),
            f"{m['parameters'] / 1e6:.1f}M",
            str(m.get("num_layers", "")),
            with_interval(m, "accuracy", percent),
            with_interval(m, "macro_f1", percent),
            with_interval(m, "teacher_agreement", percent),
            with_interval(m, "kl_to_teacher", kl),
            percent(kept) if kept is not None else "–",
        ]
        if timed:
            forward = (m.get("cost") or {}).get("forward_seconds_per_batch")
            speedup = (ret.get(name) or {}).get("speedup")
            row += [f"{forward['median'] * 1e3:.1f}" if forward else "–", f"{speedup:.2f}×" if speedup else "–"]
        rows.append(row)
    return headers, rows


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def classification_section(evaluation: dict[str, Any], run_dir: Path) -> list[str]:
    """Markdown lines: the quality table, per-class F1, the teacher's fine-tuning and the cost of a forward pass."""
    models = evaluation.get("models", {})
    if not models:
        return []
    labels = evaluation.get("labels") or []
    first = next(iter(models.values()))
    headers, rows = classification_rows(evaluation)
    lines = [
        f"## Classification on held-out data ({first.get('num_examples')} examples never trained on, "
        f"{len(labels)} classes)",
        "",
        table(headers, rows),
        "",
        "Accuracy: share of examples whose predicted class is the label; macro-F1: mean over the classes of "
        "2·TP / (2·TP + FP + FN); agrees with teacher: share predicted as the teacher predicts; KL to teacher: "
        "mean KL(teacher‖model) over the classes at T = 1; accuracy kept: model ÷ teacher. [low, high]: 95 % "
        "bootstrap interval over the held-out examples (the same resamples for every model and metric). The "
        "CE control is the same student trained on the same data for the same steps with plain cross-entropy.",
    ]
    if labels:
        f1_rows = [
            [model_label(n), *(f"{m.get('per_class_f1', {}).get(label, 0.0):.2f}" for label in labels)]
            for n, m in models.items()
        ]
        lines += ["", "F1 per class:", "", table(["model", *labels], f1_rows)]
    tuned = _read_json(run_dir / TEACHER_DIR / TRAIN_SUMMARY_FILE)
    if tuned:
        lines += [
            "",
            "The teacher is the backbone fine-tuned with a fresh classification head: "
            f"{tuned['global_step']} steps of {tuned.get('examples_per_step')} examples with plain "
            f"cross-entropy, in {tuned['train_seconds']:.0f} s (`teacher/final`).",
        ]
    lines += cost_lines(models)
    return lines


def cost_lines(models: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: one row of measured forward cost per model, and how it was measured."""
    timed = {n: m for n, m in models.items() if m.get("cost")}
    if not timed:
        return []
    rows = []
    for name, m in timed.items():
        c, disk = m["cost"], m["cost"].get("disk") or {}
        f = c["forward_seconds_per_batch"]
        rows.append(
            [
                model_label(name),
                f"{m['parameters'] / 1e6:.1f}M",
                f"{mib(disk.get('bytes'))} ({disk.get('format')})" if disk else "–",
                mib(c["weight_bytes"]),
                mib(c["peak_memory_bytes"]),
                f"{f['median'] * 1e3:.1f} ms [{f['min'] * 1e3:.1f}–{f['max'] * 1e3:.1f}]",
                f"{c['examples_per_second']['median']:.1f}",
            ]
        )
    c = next(iter(timed.values()))["cost"]
    return [
        "",
        "## Cost",
        "",
        table(["model", "params", "on disk", "weights", "peak memory", "forward / batch", "examples / s"], rows),
        "",
        f"Measured on {c.get('device_name') or c['device']} ({c['device']}, {c.get('torch_threads')} threads, "
        f"{c.get('dtype')}) on the weights scored above: one forward pass over {c['batch_size']} held-out examples "
        f"padded to {c['sequence_tokens']} tokens, {c['warmup']} warm-up run(s), then median [min–max] of "
        f"{c['repeats']} timed runs; peak memory: weights plus the most working memory of a pass "
        f"({c.get('memory_method')}).",
    ]
