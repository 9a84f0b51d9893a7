"""Benchmarks through EleutherAI's lm-evaluation-harness (`evaluation.lm_eval`, the `eval` extra).

Every model runs through lm-eval's own Python API (`simple_evaluate` on its `HFLM` wrapper) built around the very
model object and tokenizer the evaluate stage loaded: the scores are of the weights scored for quality and cost, not
of a copy reloaded from disk, and the task definitions, prompts and standard errors are lm-eval's.
"""

from __future__ import annotations

import logging
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedModel

from alambic.config import ConfigError, LmEvalConfig
from alambic.config.evaluation import LM_EVAL_MISSING
from alambic.utils import console

logger = logging.getLogger(__name__)


def require_lm_eval():
    """The `lm_eval` module, or an error that names the extra to install."""
    try:
        import lm_eval
    except ImportError as exc:
        raise ImportError(LM_EVAL_MISSING) from exc
    return lm_eval


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """lm-eval's `{"acc,none": v, "acc_stderr,none": s, "alias": ...}` of one task as `{"acc": {"value", "stderr"}}`.

    A metric under a filter other than lm-eval's "none" keeps it in its name ("exact_match,strict-match" ->
    "exact_match (strict-match)"); a standard error lm-eval could not compute ("N/A") is None.
    """
    metrics: dict[str, dict[str, float | None]] = {}
    for key, value in results.items():
        if "," not in key:  # alias, sample_len and other bookkeeping
            continue
        metric, filt = key.split(",", 1)
        is_stderr = metric.endswith("_stderr")
        metric = metric.removesuffix("_stderr")
        label = metric if filt == "none" else f"{metric} ({filt})"
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        metrics.setdefault(label, {"value": None, "stderr": None})["stderr" if is_stderr else "value"] = number
    return metrics


def run_lm_eval(
    models: dict[str, PreTrainedModel], tokenizers: dict[str, Any], cfg: LmEvalConfig, *, include_path: list[Path] = ()
) -> dict[str, Any]:
    """Run `cfg.tasks` on every model through `lm_eval.simple_evaluate`, one progress bar over the models.

    Args:
        models: {name: loaded model}, the teacher first (the report's "kept" divides by its scores).
        tokenizers: {name: its tokenizer} for every model.
        include_path: folders of custom-task YAML (alambic's local tasks, the config's include_path).

    Returns:
        {"lm_eval_version", "settings", "tasks": {task: {"version", "num_fewshot", "samples"}}, "groups": {group:
        [tasks]}, "models": {name: {"seconds", "results": {task or group: {metric: {"value", "stderr"}}}}},
        "seconds"}.

    Raises:
        ImportError: lm-eval is not installed (names `alambic[eval]`).
        ConfigError: a task name lm-eval does not know.
    """
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in (*include_path, *cfg.include_path)]
    # lm-eval indexes its thousands of task YAML files in ~20 s on a busy CPU: only when a task is not local
    manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if manager is None or len(manager.match_tasks(list(cfg.tasks))) < len(cfg.tasks):
        manager = TaskManager(include_path=paths or None)
    unknown = [t for t in cfg.tasks if not manager.match_tasks([t])]
    if unknown:  # before any model runs
        raise ConfigError(
            f"evaluation.lm_eval.tasks: lm-eval {version('lm_eval')} knows no task or group {unknown}"
            + (f" (searched its own tasks and {paths})" if paths else "")
            + "; `lm_eval ls tasks` lists them"
        )
    out: dict[str, Any] = {
        "lm_eval_version": version("lm_eval"),
        "settings": {
            "tasks": list(cfg.tasks),
            "num_fewshot": cfg.num_fewshot,
            "limit": cfg.limit,
            "batch_size": cfg.batch_size,
        },
        "tasks": {},
        "groups": {},
        "models": {},
    }
    start = time.perf_counter()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} models"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(f"lm-eval {', '.join(cfg.tasks)}", total=len(models))
        for name, model in models.items():
            progress.update(bar, description=f"lm-eval {', '.join(cfg.tasks)}: {name}")
            lm = HFLM(pretrained=model, tokenizer=tokenizers[name], batch_size=cfg.batch_size)
            t0 = time.perf_counter()
            results = simple_evaluate(
                model=lm,
                tasks=list(cfg.tasks),
                num_fewshot=cfg.num_fewshot,
                limit=cfg.limit,
                task_manager=manager,
                log_samples=False,
            )
            out["models"][name] = {
                "seconds": time.perf_counter() - t0,
                "results": {task: task_metrics(r) for task, r in results["results"].items()},
            }
            for task, task_version in results.get("versions", {}).items():
                out["tasks"].setdefault(
                    task,
                    {
                        "version": task_version,
                        "num_fewshot": results.get("n-shot", {}).get(task),
                        "samples": results.get("n-samples", {}).get(task),
                    },
                )
            out["groups"] = {g: list(t) for g, t in (results.get("group_subtasks") or {}).items() if t}
            progress.advance(bar)
    out["seconds"] = time.perf_counter() - start
    return out
