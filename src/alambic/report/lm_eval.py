"""The report's benchmark section (`evaluation.lm_eval`): one table per task group with the teacher's score, each
other model's and the share of the teacher's score it kept, lm-eval's standard errors, versions and the time taken."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alambic.report.markdown import model_label, percent, table


def score(metric: dict[str, float | None] | None) -> str:
    """`value ± stderr` (lm-eval's standard error, where it gave one)."""
    if not metric or metric.get("value") is None:
        return "–"
    stderr = metric.get("stderr")
    return f"{metric['value']:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")


def kept(metric: dict[str, float | None] | None, teacher: dict[str, float | None] | None) -> str | None:
    """Model ÷ teacher, or None where either lacks a value or the teacher scored 0."""
    if not metric or not teacher or metric.get("value") is None or not teacher.get("value"):
        return None
    return percent(metric["value"] / teacher["value"])


def task_groups(bench: dict[str, Any]) -> dict[str, list[str]]:
    """{table title: tasks and groups in it}: each lm-eval group (its aggregate first, where lm-eval gave one, then
    its tasks), then every task of no group under "tasks"."""
    results = next(iter(bench["models"].values()))["results"]
    grouped, tables = set(), {}
    for group, tasks in (bench.get("groups") or {}).items():
        tables[group] = ([group] if group in results else []) + [t for t in tasks if t in results]
        grouped.update(tables[group])
    alone = [t for t in results if t not in grouped]
    if alone:
        tables["tasks"] = alone
    return tables


def lm_eval_section(evaluation: dict[str, Any]) -> list[str]:
    """Markdown lines of the benchmark section ([] when the run ran none)."""
    bench = evaluation.get("lm_eval")
    if not bench or not bench.get("models"):
        return []
    models = bench["models"]
    teacher = models.get("teacher", {}).get("results", {})
    others = [n for n in models if n != "teacher"]
    settings = bench.get("settings", {})
    lines = ["## Benchmarks (lm-evaluation-harness)", ""]
    for title, tasks in task_groups(bench).items():
        rows = []
        for task in tasks:
            for metric in teacher.get(task) or next(iter(models.values()))["results"].get(task, {}):
                t = (teacher.get(task) or {}).get(metric)
                row = [task, metric, score(t)]
                for name in others:
                    m = models[name]["results"].get(task, {}).get(metric)
                    share = kept(m, t)
                    row.append(score(m) + (f" ({share})" if share else ""))
                rows.append(row)
        lines += [f"### {title}", "", table(["task", "metric", "teacher", *(model_label(n) for n in others)], rows), ""]
    versions = ", ".join(f"{t} v{info.get('version')}" for t, info in (bench.get("tasks") or {}).items())
    per_model = ", ".join(f"{model_label(n)} {m['seconds']:.0f} s" for n, m in models.items())
    samples = {t: (info.get("samples") or {}).get("effective") for t, info in (bench.get("tasks") or {}).items()}
    shots = settings.get("num_fewshot")
    limit = settings.get("limit")
    lines.append(
        f"lm-eval {bench.get('lm_eval_version')} ({versions}); "
        + (f"{shots}-shot" if shots is not None else "each task's default number of shots")
        + "; "
        + (f"at most {limit} examples per task" if limit else "every example")
        + f" ({', '.join(f'{t}: {n}' for t, n in samples.items() if n is not None)}). Score ± lm-eval's standard "
        f"error; (kept): the model's score ÷ the teacher's. Time: {bench.get('seconds', 0):.0f} s in all "
        f"({per_model})."
    )
    for task, record in (bench.get("local_tasks") or {}).items():
        dropped = record.get("same_text_as_training")
        lines.append(
            f"\n`{task}` is alambic's local task, {record['examples']} examples from {record['documents']} "
            f"{record['source']} documents of {record['from']}"
            + (f", {dropped} left out for having the text of a training document" if dropped else "")
            + f"; its task YAML and data are in `{'/'.join(Path(record['folder']).parts[-2:])}/`."
        )
    return lines
