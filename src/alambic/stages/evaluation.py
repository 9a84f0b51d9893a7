"""Stages 'evaluate' and 'report': every model of the run scored on the held-out split, the extra held-out sets and
the benchmarks (eval.json), then the report written from the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alambic import distributed
from alambic.config import ConfigError, RunConfig
from alambic.layout import CONTROL_DIR, DATA_DIR, EVAL_FILE, FINAL_DIR, LM_EVAL_TASKS_DIR
from alambic.pipeline import StageContext
from alambic.stages.models import check_same_tokenizer
from alambic.stages.paths import run_labels, student_source, teacher_source
from alambic.utils import atomic_write_json


def beyond_the_split(
    config: RunConfig, run_dir: Path, split: dict[str, Any], tokenizer, teacher_tokenizer=None
) -> tuple[list, list[Path], dict[str, Any]]:
    """The extra held-out sets (`evaluation.datasets`), tokenized, and alambic's local lm-eval tasks, written into
    `run_dir/lm_eval_tasks`: both checked against the run's training documents (same text). Done before the students
    load, so an overlap or a missing extra stops the stage at once.

    Returns:
        (extra sets, lm-eval include paths, {local task: record of its documents}).
    """
    from alambic.config.evaluation import LOCAL_LM_EVAL_TASKS

    ev = config.evaluation
    if config.task == "sequence_classification" and (ev.datasets or ev.lm_eval):
        raise ConfigError(
            "evaluation.datasets and evaluation.lm_eval score language models; a sequence_classification "
            "run compares classifiers on its labels: remove them"
        )
    if ev.lm_eval is not None:
        from alambic.evaluation.lm_eval import require_lm_eval

        require_lm_eval()
    local = [t for t in ev.lm_eval.tasks if t in LOCAL_LM_EVAL_TASKS] if ev.lm_eval else []
    if not ev.datasets and not local:
        return [], [], {}
    from alambic.evaluation.datasets import document_key, prepare_held_out_set, training_documents
    from alambic.evaluation.local_tasks import write_local_tasks

    training_keys = {document_key(d) for d in training_documents(config.data, split)}
    sets = [
        prepare_held_out_set(
            name,
            cfg,
            tokenizer,
            training_keys=training_keys,
            max_seq_len=config.data.max_seq_len,
            teacher_tokenizer=teacher_tokenizer,
        )
        for name, cfg in ev.datasets.items()
    ]
    if not local:
        return sets, [], {}
    folder = run_dir / LM_EVAL_TASKS_DIR
    records = write_local_tasks(local, folder, data=config.data, split=split, training_keys=training_keys)
    return sets, [folder], records


def evaluate(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Quality, generation and cost of the teacher, the student before and after distillation, the CE control
    and the configured baselines, all on the held-out split, each model loaded once (eval.json).

    Runs on every rank of a launch: each loads the models and takes its share of what splits (`evaluate_models`);
    rank 0 alone writes eval.json."""
    from alambic.data import load_prepared
    from alambic.evaluation.suite import evaluate_models
    from alambic.models import is_classifier, load_model, load_tokenizer, resolve_source

    data = load_prepared(ctx.run_dir / DATA_DIR)
    labels = run_labels(config, ctx.run_dir)  # classifiers: every model is loaded with this head
    device = config.evaluation.device or config.teacher.device
    teacher_cfg = teacher_source(config, ctx.run_dir)
    teacher = load_model(teacher_cfg.model_copy(update={"device": device}), cache=True, labels=labels)
    tokenizer = teacher_tokenizer = load_tokenizer(config.teacher)
    source = student_source(config, ctx.run_dir).model_copy(update={"device": device})
    cross = bool(data.split.get("teacher_tokenizer"))  # the student has its own tokenizer (data.cross)
    if cross:
        tokenizer = load_tokenizer(source)
    # Read once, on rank 0 (it writes the local lm-eval tasks into the run folder); every rank gets the sets.
    extra_sets, lm_eval_include, local_tasks = distributed.on_main(
        "evaluate: the extra held-out sets",
        lambda: beyond_the_split(config, ctx.run_dir, data.split, tokenizer, teacher_tokenizer if cross else None),
    )
    folders = {"student_before": None, "student_distilled": ctx.run_dir / FINAL_DIR}
    if config.evaluation.ce_control:
        folders["student_ce_control"] = ctx.run_dir / CONTROL_DIR / FINAL_DIR
    models, sources = {}, {"teacher": resolve_source(teacher_cfg.model, teacher_cfg.gguf_file)}
    for name, folder in folders.items():  # same dtype and device as the untrained student
        cfg = source if folder is None else source.model_copy(update={"model": str(folder), "gguf_file": None})
        models[name], sources[name] = load_model(cfg, labels=labels), resolve_source(cfg.model, cfg.gguf_file)
    for name, cfg in config.evaluation.baselines.items():
        # Baselines are compared with the models on the data's tokens: the student's tokenizer when it is its own.
        check_same_tokenizer(
            tokenizer,
            load_tokenizer(cfg),
            config.student.model if cross else config.teacher.model,
            f"baseline {name} ({cfg.model})",
            reference="student" if cross else "teacher",
        )
        if labels is not None and not is_classifier(cfg):
            raise ConfigError(
                f"evaluation.baselines.{name}: {cfg.model!r} is not a sequence classifier; a "
                "classification run compares classifiers trained on its labels"
            )
        cfg = cfg.model_copy(update={"device": config.evaluation.device or cfg.device})
        models[name], sources[name] = load_model(cfg, labels=labels), resolve_source(cfg.model, cfg.gguf_file)
    sources = {n: (s.path, s.gguf_file) for n, s in sources.items()}
    if labels is not None:
        from alambic.evaluation.classification import evaluate_classifier_models

        # Not split: the classifiers are scored on rank 0 alone (the cost runs need the device to themselves).
        results = distributed.on_main(
            "evaluate: the classifiers",
            lambda: evaluate_classifier_models(
                teacher, models, data, config.evaluation, labels=labels, sources=sources
            ),
        )
        keep = ("accuracy", "macro_f1", "teacher_agreement", "kl_to_teacher", "num_examples", "parameters")
    else:
        results = evaluate_models(
            teacher,
            models,
            data,
            tokenizer,
            config.evaluation,
            sources=sources,
            teacher_tokenizer=teacher_tokenizer if cross else None,
            extra_sets=extra_sets,
            lm_eval_include=lm_eval_include,
        )
        if local_tasks:
            results["lm_eval"]["local_tasks"] = local_tasks
        keep = ("perplexity", "top1_agreement", "top5_agreement", "kl_to_teacher", "num_tokens", "parameters")
    distributed.on_main(f"evaluate: write {EVAL_FILE}", lambda: atomic_write_json(ctx.run_dir / EVAL_FILE, results))
    return {
        name: {k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in keep if k in r}
        for name, r in results["models"].items()
    }


def report(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    from alambic.report.render import write_report

    path = write_report(ctx.run_dir)
    return {"report": str(path)}
