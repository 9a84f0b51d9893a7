"""The cost, retention and Pareto sections of the run report, from `eval.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alambic.report.markdown import mib, model_label, percent, table, with_interval
from alambic.report.plots import plot_pareto

TIMED = ("prefill_seconds", "latency_per_token_seconds", "throughput_tokens_per_second")
NOISY_SPREAD = 0.2  # (max - min) / median of the repeats: above this the machine was busy, not the model slow


def _timing(figure: dict[str, Any] | None, scale: float, unit: str, digits: int = 1) -> str:
    """`median unit [min–max]` of a repeated measurement."""
    if not figure:
        return "–"
    return (
        f"{figure['median'] * scale:.{digits}f} {unit} "
        f"[{figure['min'] * scale:.{digits}f}–{figure['max'] * scale:.{digits}f}]"
    )


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def cost_section(evaluation: dict[str, Any]) -> list[str]:
    """Markdown lines: one row of measured cost per model, and how it was measured."""
    models = {n: m for n, m in evaluation.get("models", {}).items() if m.get("cost")}
    if not models:
        return []
    rows = []
    for name, m in models.items():
        c = m["cost"]
        disk = c.get("disk") or {}
        rows.append(
            [
                model_label(name),
                f"{m['parameters'] / 1e6:.1f}M",
                f"{m.get('non_embedding_parameters', 0) / 1e6:.1f}M",
                f"{mib(disk.get('bytes'))} ({disk.get('format')})" if disk else "–",
                mib(c["weight_bytes"]),
                mib(c["peak_memory_bytes"]),
                _timing(c["prefill_seconds"], 1e3, "ms"),
                _timing(c["latency_per_token_seconds"], 1e3, "ms"),
                f"{c['throughput_tokens_per_second']['median']:.0f}",
            ]
        )
    c = next(iter(models.values()))["cost"]
    noisy = {
        n: m["cost"]
        for n, m in models.items()
        if any((m["cost"].get(k) or {}).get("spread") and m["cost"][k]["spread"] > NOISY_SPREAD for k in TIMED)
    }
    warning = (
        []
        if not noisy
        else [
            "",
            "**Timings disturbed:** the repeats of "
            + ", ".join(
                f"{model_label(n)} (spread up to {max(c[k]['spread'] or 0 for k in TIMED):.0%}, load average "
                f"{c.get('load_average_1min') or float('nan'):.1f})"
                for n, c in noisy.items()
            )
            + f" varied by more than {NOISY_SPREAD:.0%}: something else was using the machine. Their medians are not "
            "comparable; measure again on a quiet machine with `alambic evaluate RUN_DIR`.",
        ]
    )
    return [
        "## Cost",
        "",
        table(
            [
                "model",
                "params",
                "non-embedding",
                "on disk",
                "weights",
                "peak memory generating",
                "prefill",
                "latency / token",
                f"tokens/s at batch {c['batch_size']}",
            ],
            rows,
        ),
        "",
        f"Measured on {c.get('device_name') or c['device']} ({c['device']}, {c.get('torch_threads')} threads, "
        f"{c.get('dtype')}) on the weights scored above: greedy generation of {c['new_tokens']} tokens after a "
        f"{c['prompt_tokens']}-token held-out prompt, {c['warmup']} warm-up run(s), then median [min–max] of "
        f"{c['repeats']} timed runs. Prefill: time to the first token at batch 1; latency / token: decoding time "
        f"per generated token at batch 1; tokens/s: generated tokens per second at batch {c['batch_size']}; peak "
        f"memory: weights plus the most working memory (activations, KV cache) used while generating at batch "
        f"{c['batch_size']} ({c.get('memory_method', 'see cost.py')}). On disk: the file the model was loaded from "
        "(a GGUF teacher is stored quantized, so compare parameters or weights, not disk, with it).",
        *warning,
    ]


RETENTION_COLUMNS = [
    ("perplexity", "perplexity kept", percent),
    ("top1_agreement", "top-1 agree", percent),
    ("rouge_l_reference", "ROUGE-L kept", percent),
    ("speedup", "speed-up (latency)", _ratio),
    ("throughput_gain", "throughput", _ratio),
    ("size_reduction", "smaller (params)", _ratio),
    ("memory_reduction", "less memory", _ratio),
]


GAIN_NAMES = {
    "speedup": "speed-up (latency)",
    "throughput_gain": "throughput",
    "size_reduction": "size (parameters)",
    "memory_reduction": "peak memory",
}


def retention_section(evaluation: dict[str, Any], run_dir: Path) -> list[str]:
    """Markdown lines: quality retained against cost saved per model, the Pareto fronts and their plot."""
    ret = evaluation.get("retention") or {}
    if not ret:
        return []
    columns = [c for c in RETENTION_COLUMNS if any(r.get(c[0]) is not None for r in ret.values())]
    rows = [
        [model_label(name)] + [fmt(r[key]) if r.get(key) is not None else "–" for key, _, fmt in columns]
        for name, r in ret.items()
        if name != "teacher"
    ]
    lines = [
        "## Retention and Pareto front",
        "",
        table(["model", *(title for _, title, _ in columns)], rows),
        "",
        "Quality kept: teacher perplexity ÷ model perplexity (1.00 = the teacher's), ROUGE-L against the "
        "references ÷ the teacher's; cost saved: teacher ÷ model for latency, parameters and peak memory, "
        "model ÷ teacher for throughput (above 1 = better than the teacher).",
    ]
    fronts = evaluation.get("pareto_front") or {}
    if fronts:
        lines += [""] + [
            f"- Pareto front, perplexity kept against {GAIN_NAMES.get(gain, gain)}: "
            f"{', '.join(model_label(n) for n in names)}"
            for gain, names in fronts.items()
        ]
    path = plot_pareto(ret, fronts, run_dir / "plots" / "pareto.png", label=model_label)
    if path is not None:
        lines += ["", "![Quality kept against cost saved](plots/pareto.png)"]
    return lines


def generation_section(evaluation: dict[str, Any]) -> list[str]:
    """Markdown lines: ROUGE-L and exact match of greedy responses to held-out prompts (chat data)."""
    models = {n: m["generation"] for n, m in evaluation.get("models", {}).items() if m.get("generation")}
    if not models:
        return []

    def cell(g: dict[str, Any] | None, key: str) -> str:
        return with_interval(g, key, lambda v: f"{v:.3f}") if g else "–"

    rows = [
        [
            model_label(n),
            cell(g["reference"], "rouge_l"),
            cell(g["reference"], "exact_match"),
            cell(g.get("teacher"), "rouge_l"),
            f"{g['reference']['response_tokens']['mean']:.1f}",
            percent(g["reference"]["truncated_share"]),
        ]
        for n, g in models.items()
    ]
    first = next(iter(models.values()))["reference"]
    lines = [
        f"## Responses to held-out prompts ({first['num_prompts']} prompts never trained on)",
        "",
        table(
            [
                "model",
                "ROUGE-L vs reference",
                "exact match vs reference",
                "ROUGE-L vs teacher",
                "mean tokens",
                "hit length cap",
            ],
            rows,
        ),
        "",
        "Greedy responses; ROUGE-L F-measure (rouge-score, stemmed), exact match after lower-casing and "
        "removing punctuation and articles; [low, high]: 95 % bootstrap interval over prompts.",
    ]
    shown = "student_distilled" if "student_distilled" in models else next(iter(models))
    for ex in (models[shown].get("examples") or [])[:2]:
        lines += [
            "",
            f"> **prompt** {ex['prompt']}  \n> **reference** {ex['reference']}  \n"
            f"> **{model_label(shown)}** {ex['response']}",
        ]
    return lines
