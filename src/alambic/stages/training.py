"""Stages 'distill' and 'control': the student trained against the teacher (live, cached or several), and the
same student trained with plain cross-entropy; language models and classifiers alike."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from alambic import distributed
from alambic.config import LossConfig, RunConfig
from alambic.layout import CONTROL_DIR, DATA_DIR, STUDENT_DIR, STUDENT_FILE, TRAIN_SUMMARY_FILE
from alambic.pipeline import StageContext
from alambic.stages.data import _cache_fingerprint, cache_folder, distill_train_set
from alambic.stages.run_models import RunModels
from alambic.utils import atomic_write_json


def _train(
    config: RunConfig, ctx: StageContext, *, loss: LossConfig, out: Path, with_teacher: bool, teacher_data: bool = False
) -> dict[str, Any]:
    models = RunModels(config, ctx.run_dir)  # each model, tokenizer and fact about them resolved once, passed down
    if config.task == "sequence_classification":
        return _train_classifier(config, ctx, models, loss=loss, out=out, with_teacher=with_teacher)
    from alambic.data import load_prepared
    from alambic.teachers import OfflineCache, choose
    from alambic.training.run import train

    kept_layers = None
    if config.student.from_teacher is not None:  # pruned from this teacher: `layer_map: auto` pairs the kept layers
        kept_layers = json.loads((ctx.run_dir / STUDENT_DIR / STUDENT_FILE).read_text()).get("kept_layers")
    data = load_prepared(ctx.run_dir / DATA_DIR)
    if teacher_data:  # the held-out split stays the real data: only what is trained on changes
        data.train = distill_train_set(config, ctx.run_dir, data.train)
    student, tokenizer = models.student(), models.student_tokenizer
    if not with_teacher:  # the CE control trains on the data's answers only
        loss = loss.model_copy(update={"on_policy": None})
    # The teacher source, chosen here once (none: plain cross-entropy); it makes the batches it reads (train asks it).
    signal = None
    if with_teacher and config.data.teacher_cache is not None:  # checked against the data before any step
        fingerprint = partial(_cache_fingerprint, config, models.teacher_tokenizer)
        signal = choose(loss, cached=OfflineCache(cache_folder(config, ctx.run_dir), fingerprint))
    elif with_teacher:
        # A teacher with another tokenizer reads its own tokens of the same texts (data.cross): the batches carry them.
        cross = bool(data.split.get("teacher_tokenizer"))
        signal = choose(
            loss,
            teacher=models.teacher(),
            cross_tokenizer=cross,
            additional=models.additional_teachers(),
            teacher_pad_token_id=models.teacher_tokenizer.pad_token_id if cross else None,
            teacher_weight=config.teacher_weight,
        )
    summary = train(
        student,
        tokenizer,
        data,
        teacher=None,
        loss=loss,
        training=config.training,
        output_dir=out,
        resume=ctx.resume,
        kept_layers=kept_layers,
        source=signal,
    )
    if distributed.is_main():  # every rank trains (DDP); rank 0 alone writes the run folder
        atomic_write_json(out / TRAIN_SUMMARY_FILE, summary)
    return {k: v for k, v in summary.items() if k != "log_history"}


def _train_classifier(
    config: RunConfig, ctx: StageContext, models: RunModels, *, loss: LossConfig, out: Path, with_teacher: bool
) -> dict[str, Any]:
    from alambic.data import load_prepared
    from alambic.training.classifier import train_classifier

    # A given student that is a backbone gets a fresh head; the pruned one is already a classifier.
    student = models.student()
    teacher = models.classifier_teacher() if with_teacher else None
    summary = train_classifier(
        student,
        models.student_tokenizer,
        load_prepared(ctx.run_dir / DATA_DIR),
        teacher=teacher,
        loss=loss,
        training=config.training,
        output_dir=out,
        resume=ctx.resume,
    )
    if distributed.is_main():  # every rank trains (DDP); rank 0 alone writes the run folder
        atomic_write_json(out / TRAIN_SUMMARY_FILE, summary)
    return {k: v for k, v in summary.items() if k != "log_history"}


def distill(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    return _train(config, ctx, loss=config.loss, out=ctx.run_dir, with_teacher=config.loss.alpha > 0, teacher_data=True)


def control(config: RunConfig, ctx: StageContext) -> dict[str, Any]:
    """The same student, data and steps, trained with plain cross-entropy: what distillation must beat."""
    # Plain CE: no teacher, no features, no on-policy steps. Built from the two loss fields that change how CE is
    # computed, and declared as the stage's only loss inputs, so a loss sweep shares one control.
    ce = LossConfig(alpha=0.0, implementation=config.loss.implementation, chunk_size=config.loss.chunk_size)
    return _train(config, ctx, loss=ce, out=ctx.run_dir / CONTROL_DIR, with_teacher=False)
