"""Stages 'teacher' and 'student': fine-tune the teacher into a classifier, cut the student from the teacher or
check the user's own; and the models around them (the classification teacher, the additional teachers), each
checked to share the teacher's tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from alambic import distributed
from alambic.combinations import two_vocabulary_refusals
from alambic.config import ConfigError, RunConfig
from alambic.layout import DATA_DIR, FINAL_DIR, PRUNING_FILE, STUDENT_DIR, STUDENT_FILE, TEACHER_DIR, TRAIN_SUMMARY_FILE
from alambic.pipeline import StageContext
from alambic.stages.paths import run_labels, student_source, teacher_source
from alambic.utils import atomic_write_json, console, native_bf16, resolve_dtype

if TYPE_CHECKING:  # torch-free import of this module: the CLI's help must stay fast
    from alambic.teachers.ensemble import WeightedTeacher


def _classifier_teacher(config: RunConfig, run_dir: Path):
    """The teacher classifier of a classification run; a backbone without teacher.fine_tune is refused (its head
    would be random)."""
    from alambic.models import is_classifier, load_model

    source = teacher_source(config, run_dir)
    if not is_classifier(source):
        raise ConfigError(
            f"task sequence_classification: teacher {config.teacher.model!r} is not a sequence "
            "classifier, and a fresh head would teach noise; set teacher.fine_tune to train one first"
        )
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
    summary = fine_tune_teacher(
        backbone, load_tokenizer(config.teacher), load_prepared(ctx.run_dir / DATA_DIR), cfg, out, resume=ctx.resume
    )
    forget_loaded(str(out / FINAL_DIR))  # a teacher loaded earlier in this process from there is outdated
    if distributed.is_main():  # every rank trains (DDP); rank 0 alone writes the run folder
        atomic_write_json(out / TRAIN_SUMMARY_FILE, summary)
    return {k: v for k, v in summary.items() if k != "log_history"}


def build_student(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """The student: the user's own (checked against the teacher's tokenizer), or pruned from the teacher."""
    from alambic.models import load_model, load_tokenizer
    from alambic.students.prune import save_student

    if config.student.from_teacher is None:
        _, teacher_tok = data_tokenizers(config, ctx.run_dir)  # another tokenizer runs only as a cross choice
        record = {"method": "given", "source": config.student.model, "own_tokenizer": teacher_tok is not None}
        atomic_write_json(ctx.run_dir / STUDENT_DIR / STUDENT_FILE, record)
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
    atomic_write_json(folder / PRUNING_FILE, record)  # the whole pruning report
    s, t = record["student_parameters"]["total"], record["teacher_parameters"]["total"]
    console.print(
        f"student: {record['student_shape']} from {record['teacher_shape']}, {s / 1e6:.1f}M of "
        f"{t / 1e6:.1f}M parameters ({folder / 'pruning.json'})",
        markup=False,
    )
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
    calibration = (
        None
        if classifier
        else calibration_batches(
            data.train,
            num_sequences=cfg.calibration_sequences,
            batch_size=config.evaluation.batch_size,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # bf16 autocast where the run trains in bf16 and the device has it natively: 3x faster on CPU with AMX (5x slower
    # where it is emulated), and on SmolLM2 it ranks the layers exactly as fp32 does (skip-loss increases agree to 3
    # decimals); statistics still accumulate in fp32.
    device = next(teacher.parameters()).device.type
    with torch.autocast(
        device, dtype=torch.bfloat16, enabled=config.training.bf16 is not False and native_bf16(device)
    ):
        student, record = build_from_teacher(teacher, cfg, calibration)
    if config.student.dtype != "auto":
        student.to(dtype=resolve_dtype(config.student.dtype))
    record["teacher"] = config.teacher.model
    if cfg.evaluate and not classifier:  # a classifier is scored right after pruning by evaluate's student_before
        scores = evaluate_against_teacher(
            teacher,
            {"student_pruned": student},
            data.validation,
            pad_token_id=tokenizer.pad_token_id,
            batch_size=config.evaluation.batch_size,
        )
        record["after_pruning"] = {
            name: {k: scores[name][k] for k in ("perplexity", "top1_agreement", "kl_to_teacher", "num_tokens")}
            for name in scores
        }
    return student, record


def same_tokenizer(a, b) -> bool:
    """Whether logits of models with these tokenizers can be compared id by id: the smaller vocabulary is contained
    in the larger one with the same ids (one family's checkpoints may add tokens)."""
    va, vb = a.get_vocab(), b.get_vocab()
    small, large = (va, vb) if len(va) <= len(vb) else (vb, va)
    return all(large.get(token) == i for token, i in small.items())


def _tokenizer_gap(a_tok, b_tok, a_label: str, b_label: str) -> str:
    va, vb = a_tok.get_vocab(), b_tok.get_vocab()
    moved = [t for t, i in vb.items() if va.get(t, i) != i]
    return (
        f"{a_label} and {b_label} have different tokenizers ({len(va)} vs {len(vb)} tokens, "
        f"{len(set(va) & set(vb))} shared, {len(moved)} of them with different ids, e.g. {moved[:3]})"
    )


def check_same_tokenizer(
    teacher_tok, other_tok, teacher_name: str, other_name: str, *, reference: str = "teacher"
) -> None:
    """Logit losses and agreement metrics need one vocabulary: refuse two tokenizers that are not one (see
    `same_tokenizer`). `reference`: the role of the first model in the message (the student, when the data is in
    its tokens). For the student itself, `data_tokenizers` offers the ways round it instead."""
    if not same_tokenizer(teacher_tok, other_tok):
        gap = _tokenizer_gap(teacher_tok, other_tok, f"{reference} {teacher_name!r}", repr(other_name))
        raise ConfigError(
            f"{gap}: logits can only be compared over one vocabulary. Use a model with the {reference}'s tokenizer."
        )


def data_tokenizers(config: RunConfig, run_dir: Path) -> tuple[Any, Any | None]:
    """(the tokenizer the run's data is made with, the teacher's when the student has another one, else None).

    A student given with another tokenizer than the teacher's is detected here, before any data is made, and runs
    only as one of the two cross-tokenizer choices: ULD (`loss.divergence: uld`: the teacher reads the same texts in
    its own tokens, `data.cross`) or response distillation (`data.teacher_responses` with `loss.alpha: 0`: the
    student learns the teacher's generated text in its own tokens).

    Raises:
        ConfigError: another tokenizer and neither choice, or a choice with a part that needs one vocabulary.
    """
    from alambic.models import load_tokenizer

    teacher_tok = load_tokenizer(config.teacher)
    if config.student.from_teacher is not None:
        return teacher_tok, None  # a pruned student keeps the teacher's tokenizer
    student_tok = load_tokenizer(student_source(config, run_dir))
    if same_tokenizer(teacher_tok, student_tok):
        return teacher_tok, None
    gap = _tokenizer_gap(
        teacher_tok, student_tok, f"teacher {config.teacher.model!r}", f"student {config.student.model!r}"
    )
    if config.task != "causal_lm":
        raise ConfigError(
            f"{gap}: a classification run tokenizes its examples once, with the teacher's tokenizer; "
            "use a student with the teacher's tokenizer"
        )
    loss, data = config.loss, config.data
    uld = loss.divergence == "uld" and loss.alpha > 0
    response = loss.alpha == 0 and data.teacher_responses is not None
    if not (uld or response):
        raise ConfigError(
            f"{gap}: token-level logit losses need one vocabulary. Choose one of:\n"
            "  loss.divergence: uld   Universal Logit Distillation: the teacher reads the same texts in its own "
            "tokens, and the sorted probability vectors are compared where the two tokenizations line up;\n"
            "  data.teacher_responses: {...} with loss.alpha: 0   response distillation: the student learns the "
            "teacher's generated answers (chat data) in its own tokens."
        )
    refused = two_vocabulary_refusals(config)  # the one table: alambic.combinations
    if refused:
        raise ConfigError(
            f"{gap}: {', '.join(refused)} compare the models token by token, which needs one "
            f"vocabulary; remove {'it' if len(refused) == 1 else 'them'} for a student with its own "
            "tokenizer"
        )
    return student_tok, teacher_tok


def load_additional_teachers(config: RunConfig, teacher_tokenizer: Any = None) -> list[WeightedTeacher]:
    """`config.additional_teachers` loaded as `teachers.ensemble.WeightedTeacher`s named 'additional_<i>', each
    checked to share the teacher's tokenizer first (all of them before any model is loaded).

    Raises:
        ConfigError: a teacher whose tokenizer differs from `config.teacher`'s (the message names it).
    """
    from alambic.models import load_model, load_tokenizer
    from alambic.teachers.ensemble import WeightedTeacher

    tokenizer = teacher_tokenizer if teacher_tokenizer is not None else load_tokenizer(config.teacher)
    for i, cfg in enumerate(config.additional_teachers):
        check_same_tokenizer(
            tokenizer, load_tokenizer(cfg), config.teacher.model, f"additional_teachers[{i}] ({cfg.model})"
        )
    # Not cached: only distillation uses them, and their memory is freed when it ends.
    return [
        WeightedTeacher(
            name=f"additional_{i}", model=load_model(cfg), weight=cfg.weight, follow_student=cfg.device == "auto"
        )
        for i, cfg in enumerate(config.additional_teachers)
    ]
