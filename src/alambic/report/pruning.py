"""The pruning section of the run report, from `student/pruning.json` and `eval.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alambic.report.markdown import kl, percent, perplexity, table
from alambic.report.plots import plot_head_importance, plot_layer_importance

SHAPE_ROWS = [
    ("decoder layers", "num_layers"),
    ("query heads", "num_attention_heads"),
    ("KV heads", "num_key_value_heads"),
    ("FFN size", "intermediate_size"),
    ("hidden size", "hidden_size"),
]


def _quality_row(label: str, m: dict[str, Any] | None) -> list[str] | None:
    if not m:
        return None
    return [label, perplexity(m["perplexity"]), percent(m["top1_agreement"]), kl(m["kl_to_teacher"])]


def pruning_section(pruning: dict[str, Any], evaluation: dict[str, Any], run_dir: Path) -> list[str]:
    """Markdown lines: shape before/after, sizes, what was removed and why, quality after pruning and after
    distillation, importance plots (written to `run_dir/plots/`)."""
    t, s = pruning["teacher_shape"], pruning["student_shape"]
    tp, sp = pruning["teacher_parameters"], pruning["student_parameters"]
    lines = [
        "## Pruning",
        "",
        table(["", "teacher", "student"], [[label, str(t.get(k)), str(s.get(k))] for label, k in SHAPE_ROWS]),
    ]
    lines += [
        "",
        table(
            ["size", "teacher", "student", "ratio"],
            [
                [
                    "parameters",
                    f"{tp['total'] / 1e6:.1f}M",
                    f"{sp['total'] / 1e6:.1f}M",
                    f"{sp['total'] / tp['total']:.2f}",
                ],
                [
                    "non-embedding parameters",
                    f"{tp['non_embedding'] / 1e6:.1f}M",
                    f"{sp['non_embedding'] / 1e6:.1f}M",
                    f"{sp['non_embedding'] / max(tp['non_embedding'], 1):.2f}",
                ],
                [
                    "weights (teacher dtype)",
                    f"{pruning['teacher_tensor_bytes'] / 2**20:.0f} MiB",
                    f"{pruning['student_tensor_bytes'] / 2**20:.0f} MiB",
                    f"{pruning['student_tensor_bytes'] / pruning['teacher_tensor_bytes']:.2f}",
                ],
            ],
        ),
    ]
    if "student_disk_bytes" in pruning:
        lines += [
            "",
            f"Student on disk (safetensors at the student dtype): {pruning['student_disk_bytes'] / 2**20:.0f} MiB.",
        ]
    imp = pruning.get("importance") or {}
    lines += [
        "",
        f"Layers kept ({pruning['layer_ranking']}): {pruning['kept_layers']}; removed: "
        f"{pruning.get('removed_layers', [])}.",
    ]
    if s["num_attention_heads"] != t["num_attention_heads"] or s["num_key_value_heads"] != t["num_key_value_heads"]:
        lines.append(
            f"Attention: {s['num_attention_heads']} of {t['num_attention_heads']} query heads and "
            f"{s['num_key_value_heads']} of {t['num_key_value_heads']} KV heads kept in every layer, "
            "chosen per layer (see pruning.json `plan`)."
        )
    if imp:
        lines.append(
            f"Importance measured on {imp.get('num_sequences')} calibration sequences "
            f"({imp.get('num_tokens')} tokens) of the training split; teacher calibration loss "
            f"{imp.get('base_loss', float('nan')):.3f}."
        )
    # Right after pruning: measured by the student stage, else (from_teacher.evaluate: false) the evaluate
    # stage's `student_before`, the same weights scored on the same held-out split.
    after = pruning.get("after_pruning") or {}
    models = evaluation.get("models", {})
    rows = [
        r
        for r in (
            _quality_row("teacher", after.get("teacher") or models.get("teacher")),
            _quality_row("right after pruning", after.get("student_pruned") or models.get("student_before")),
            _quality_row("after distillation", models.get("student_distilled")),
        )
        if r
    ]
    if rows:
        lines += [
            "",
            "Quality on the held-out split:",
            "",
            table(["student", "perplexity", "top-1 agree", "KL to teacher"], rows),
        ]
    for title, plot, name in (
        ("Layer importance", plot_layer_importance, "layer_importance.png"),
        ("Head importance", plot_head_importance, "head_importance.png"),
    ):
        path = plot(pruning, run_dir / "plots" / name)
        if path is not None:
            lines += ["", f"![{title}](plots/{name})"]
    return lines
