"""Stages 'teacher' and 'student': fine-tune the teacher into a classifier, cut the student from the teacher or
check the user's own; and the models around them (the classification teacher, the additional teachers), each
checked to share the teacher's tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from alambic.config import ConfigError, RunConfig
from alambic.pipeline import StageContext
from alambic.stages.paths import (DATA_DIR, FINAL_DIR, STUDENT_DIR, TEACHER_DIR, run_labels, student_source,
                                  teacher_source)
from alambic.utils import atomic_write_json, console, resolve_dtype

if TYPE_CHECKING:  # torch-free import of this module: the CLI's help must stay fast
    from alambic.training.teachers import WeightedTeacher


def _classifier_teacher(config: RunConfig, run_dir: Path):
    """The teacher classifier of a classification run; a backbone without teacher.fine_tune is refused (its head
    would be random)."""
    from alambic.models import is_classifier, load_model

    source = teacher_source(config, run_dir)
    if not is_classifier(source):
        raise ConfigError(f"task sequence_classification: teacher {config.teacher.model!r} is not a sequence "
                          "classifier, and a fresh head would teach noise; set teacher.fine_tune to train one first")
    return load_model(source, cache=True, labels=run_labels(config, run_dir))


def fine_tune(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """Fine-tune the teacher backbone with a fresh classification head (teacher.fine_tune) into teacher/final."""
    import torch

    from alambic.data import load_prepared
    from alambic.models import forget_loaded, load_model, load_tokenizer
    from alambic.training.classifier import fine_tune_teacher

    cfg = config.teacher.fine_tune
    torch.manual_seed(cfg.seed)  # the fresh head's initialisation
    # Not from the process cache: training changes the weights in place.
    backbone = load_model(config.teacher, labels=run_labels(config, ctx.run_dir))
    out = ctx.run_dir / TEACHER_DIR
    summary = fine_tune_teacher(backbone, load_tokenizer(config.teacher), load_prepared(ctx.run_dir / DATA_DIR), cfg,
                                out, resume=ctx.resume)
    forget_loaded(str(out / FINAL_DIR))  # a teacher loaded earlier in this process from there is outdated
    atomic_write_json(out / "train_summary.json", summary)
    return {k: v for k, v in summary.items() if k != "log_history"}


def build_student(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """The student: the user's own (checked against the teacher's tokenizer), or pruned from the teacher."""
    from alambic.models import load_model, load_tokenizer
    from alambic.students.prune import save_student

    if config.student.from_teacher is None:
        tok_t, tok_s = load_tokenizer(config.teacher), load_tokenizer(student_source(config, ctx.run_dir))
        check_same_tokenizer(tok_t, tok_s, config.teacher.model, f"student {config.student.model}")
        record = {"method": "given", "source": config.student.model}
        atomic_write_json(ctx.run_dir / STUDENT_DIR / "student.json", record)
        return record
    if config.task == "sequence_classification":  # the classifier (fine-tuned) is what the student is cut from
        teacher, tokenizer = _classifier_teacher(config, ctx.run_dir), load_tokenizer(config.teacher)
    else:
        teacher, tokenizer = load_model(config.teacher, cache=True), load_tokenizer(config.teacher)
    student, record = prune_student(config, ctx, teacher, tokenizer)
    folder = ctx.run_dir / STUDENT_DIR
    summary = {k: v for k, v in record.items() if k not in ("importance", "plan", "after_pruning")}
    save_student(student, tokenizer, folder, summary)  # student.json: how it was made, in brief
    record["student_disk_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    atomic_write_json(folder / "pruning.json", record)  # the whole pruning report
    s, t = record["student_parameters"]["total"], record["teacher_parameters"]["total"]
    console.print(f"student: {record['student_shape']} from {record['teacher_shape']}, {s / 1e6:.1f}M of "
                  f"{t / 1e6:.1f}M parameters ({folder / 'pruning.json'})")
    return summary


def prune_student(config: RunConfig, ctx: StageContext, teacher, tokenizer) -> tuple[Any, dict[str, Any]]:
    """Measure importance on training sequences, cut the student, and score it on held-out data right away."""
    import torch

    from alambic.data import load_prepared
    from alambic.evaluation.quality import evaluate_against_teacher
    from alambic.students.build import build_from_teacher
    from alambic.students.importance import calibration_batches

    cfg = config.student.from_teacher
    data = load_prepared(ctx.run_dir / DATA_DIR)
    # Importance is measured with the LM loss: a classifier has none (the config allows it only layers by position).
    classifier = config.task == "sequence_classification"
    calibration = None if classifier else calibration_batches(
        data.train, num_sequences=cfg.calibration_sequences, batch_size=config.evaluation.batch_size,
        pad_token_id=tokenizer.pad_token_id)
    # bf16 autocast where the run trains in bf16: 3x faster on CPU with AMX, and on SmolLM2 it ranks the layers
    # exactly as fp32 does (skip-loss increases agree to 3 decimals); statistics still accumulate in fp32.
    device = next(teacher.parameters()).device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=config.training.bf16 and device in ("cpu", "cuda")):
        student, record = build_from_teacher(teacher, cfg, calibration)
    if config.student.dtype != "auto":
        student.to(dtype=resolve_dtype(config.student.dtype))
    record["teacher"] = config.teacher.model
    if cfg.evaluate and not classifier:  # a classifier is scored right after pruning by evaluate's student_before
        scores = evaluate_against_teacher(teacher, {"student_pruned": student}, data.validation,
                                          pad_token_id=tokenizer.pad_token_id, batch_size=config.evaluation.batch_size)
        record["after_pruning"] = {name: {k: scores[name][k] for k in ("perplexity", "top1_agreement", "kl_to_teacher",
                                                                     "num_tokens")} for name in scores}
    return student, record


def check_same_tokenizer(teacher_tok, other_tok, teacher_name: str, other_name: str) -> None:
    """Logit losses and agreement metrics need one vocabulary: refuse two tokenizers that disagree on shared ids."""
    tv, sv = teacher_tok.get_vocab(), other_tok.get_vocab()
    disagree = [tok for tok, i in sv.items() if tv.get(tok, i) != i]
    if disagree or abs(len(tv) - len(sv)) > 0 and not (set(sv) <= set(tv) or set(tv) <= set(sv)):
        raise ConfigError(
            f"teacher {teacher_name!r} and {other_name!r} have different tokenizers "
            f"({len(tv)} vs {len(sv)} tokens, {len(disagree)} shared tokens with different ids, e.g. "
            f"{disagree[:3]}): logits can only be compared over one vocabulary. Use a model with the teacher's "
            "tokenizer."
        )


def load_additional_teachers(config: RunConfig) -> list[WeightedTeacher]:
    """`config.additional_teachers` loaded as `training.teachers.WeightedTeacher`s named 'additional_<i>', each
    checked to share the teacher's tokenizer first (all of them before any model is loaded).

    Raises:
        ConfigError: a teacher whose tokenizer differs from `config.teacher`'s (the message names it).
    """
    from alambic.models import load_model, load_tokenizer
    from alambic.training.teachers import WeightedTeacher

    tokenizer = load_tokenizer(config.teacher)
    for i, cfg in enumerate(config.additional_teachers):
        check_same_tokenizer(tokenizer, load_tokenizer(cfg), config.teacher.model,
                             f"additional_teachers[{i}] ({cfg.model})")
    # Not cached: only distillation uses them, and their memory is freed when it ends.
    return [WeightedTeacher(name=f"additional_{i}", model=load_model(cfg), weight=cfg.weight,
                            follow_student=cfg.device == "auto")
            for i, cfg in enumerate(config.additional_teachers)]
