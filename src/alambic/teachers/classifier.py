"""A classifier teacher: class logits (B, C), one row per example, distilled with the same objective as token logits
(`losses.distillation_loss`, one counted "token" per example)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from alambic.combinations import CLASSIFIER, DECLARED
from alambic.data.classification import ClassificationCollator
from alambic.losses import distillation_loss
from alambic.teachers.base import Batches, BatchSettings, Requirements, SoftLoss, StudentStep

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from alambic.config import LossConfig
    from alambic.data import PreparedData


class ClassifierTeacher:
    """The teacher classifier run on the student's batch; None: plain cross-entropy on the labels (alpha = 0, the
    teacher's own fine-tuning)."""

    name: ClassVar[str] = CLASSIFIER
    requirements: ClassVar[Requirements] = DECLARED[CLASSIFIER]
    teacher_core = None

    def __init__(self, teacher: PreTrainedModel | None):
        self._given = teacher
        self.teacher: nn.Module | None = teacher

    def models(self) -> tuple[nn.Module, ...]:
        return (self._given,) if self._given is not None else ()

    def setup(self, trainer: Any) -> None:
        if self._given is not None:
            self.teacher = trainer.prepare_teacher(self._given)

    def batches(self, data: PreparedData, settings: BatchSettings) -> Batches:
        """The labelled examples as they are, padded with the student config's pad id (`settings.pad_token_id`):
        one label per example (B,)."""
        return Batches(data.train, data.validation, ClassificationCollator(pad_token_id=settings.pad_token_id))

    def soft_loss(self, step: StudentStep, loss: LossConfig) -> SoftLoss:
        teacher_logits = None
        if self.teacher is not None:
            batch = {"input_ids": step.inputs["input_ids"], "attention_mask": step.inputs.get("attention_mask")}
            with torch.inference_mode():
                teacher_logits = self.teacher(**batch).logits
            teacher_logits = teacher_logits.clone()  # inference tensors cannot be saved for backward
        return SoftLoss(
            distillation_loss(
                step.logits,
                teacher_logits,
                step.targets,
                divergence=loss.divergence_spec,
                alpha=loss.alpha,
                num_items_in_batch=step.num_items_in_batch,
            )
        )
