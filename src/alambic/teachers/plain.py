"""No teacher: plain cross-entropy on the data's labels (loss.alpha = 0, and the CE control every run trains)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from alambic.combinations import DECLARED, PLAIN
from alambic.losses.chunked import chunked_distillation_loss
from alambic.losses.divergences import LossParts
from alambic.losses.heads import OutputHead, module_logits
from alambic.losses.mixture import multi_teacher_distillation_loss
from alambic.sharding import through_heads
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

            def objective(heads: list[OutputHead], hidden: Tensor) -> LossParts:
                return chunked_distillation_loss(
                    hidden,
                    heads[0],
                    None,
                    None,
                    step.targets,
                    chunk_size=loss.chunk_size,
                    teachers=loss.teachers,
                    **options,
                )
        else:

            def objective(heads: list[OutputHead], hidden: Tensor) -> LossParts:
                return multi_teacher_distillation_loss(
                    module_logits(hidden, heads[0]), [], step.targets, teachers=loss.teachers, **options
                )

        # The head is read as tensors: `sharding.through_heads` has FSDP / ZeRO-3 gather it where they shard it.
        parts = through_heads([step.core], objective, step.hidden)
        return SoftLoss(parts)
