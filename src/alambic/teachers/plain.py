"""No teacher: plain cross-entropy on the data's labels (loss.alpha = 0, and the CE control every run trains)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from alambic.combinations import DECLARED, PLAIN
from alambic.losses.chunked import OutputHead, chunked_distillation_loss
from alambic.losses.mixture import multi_teacher_distillation_loss
from alambic.modeling import project
from alambic.teachers.base import NoLiveTeacher, Requirements, SoftLoss, StudentStep, TokenBatches

if TYPE_CHECKING:
    from alambic.config import LossConfig


class NoTeacher(NoLiveTeacher, TokenBatches):
    """The hard term alone, through the same loss functions as a teacher's (so that alpha = 0 is exactly their
    edge case), on the student's own tokens."""

    name: ClassVar[str] = PLAIN
    requirements: ClassVar[Requirements] = DECLARED[PLAIN]

    def soft_loss(self, step: StudentStep, loss: LossConfig) -> SoftLoss:
        options = dict(divergence=loss.divergence_spec, alpha=loss.alpha, num_items_in_batch=step.num_items_in_batch)
        if loss.implementation == "chunked":
            parts = chunked_distillation_loss(step.hidden, OutputHead.of(step.core), None, None, step.targets,
                                              chunk_size=loss.chunk_size, teachers=loss.teachers, **options)
        else:
            parts = multi_teacher_distillation_loss(project(step.core, step.hidden), [], step.targets,
                                                    teachers=loss.teachers, **options)
        return SoftLoss(parts)
