"""A teacher with another tokenizer (`data.cross`): it reads the same texts in its own tokens, and the tokenizer-free
ULD (loss.divergence 'uld', sorted probability vectors) is taken where the two tokenizations line up."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from alambic.combinations import CROSS, DECLARED
from alambic.data.tokenize import DistillationCollator
from alambic.divergence import DivergenceSpec
from alambic.losses.chunked import OutputHead, chunked_distillation_loss
from alambic.losses.divergences import LossParts, mix_soft_and_hard
from alambic.modeling import final_hidden_states
from alambic.sharding import frozen_forward, through_heads
from alambic.teachers.base import Batches, BatchSettings, Requirements, SoftLoss, StudentStep

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from alambic.config import LossConfig
    from alambic.data import PreparedData

# The teacher's own tokens of each sequence, and for each student position its partner there (-1: none).
CROSS_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_positions")


class CrossTokenizerTeacher:
    """The live teacher on its own tokens; the soft term only at the student positions with a partner.

    Args:
        pad_token_id: the teacher tokenizer's pad id, which pads its tokens in the batches; None: a source for the
            loss alone (a trainer given batches that already carry the teacher's tokens), which cannot make batches.
    """

    name: ClassVar[str] = CROSS
    requirements: ClassVar[Requirements] = replace(DECLARED[CROSS], columns=CROSS_KEYS)

    def __init__(self, teacher: PreTrainedModel, pad_token_id: int | None = None):
        self._given = teacher
        self.teacher: nn.Module = teacher
        self.pad_token_id = pad_token_id

    @property
    def teacher_core(self) -> PreTrainedModel:
        return getattr(self.teacher, "module", self.teacher)

    def models(self) -> tuple[nn.Module, ...]:
        return (self._given,)

    def setup(self, trainer: Any) -> None:
        self.teacher = trainer.prepare_teacher(self._given)

    def batches(self, data: PreparedData, settings: BatchSettings) -> Batches:
        """The prepared pairs (`data.cross`) as they are; the collator pads the teacher's tokens with its own pad id
        beside the student's (`CROSS_KEYS`)."""
        if self.pad_token_id is None:
            raise ValueError(
                "CrossTokenizerTeacher(teacher) was made without the teacher tokenizer's pad id, so it "
                "cannot pad the teacher's tokens: pass teachers.choose(..., teacher_pad_token_id=...)"
            )
        return Batches(
            data.train,
            data.validation,
            DistillationCollator(
                pad_token_id=settings.pad_token_id,
                prompt_lengths=settings.prompt_lengths,
                teacher_pad_token_id=self.pad_token_id,
                padding_free=settings.padding_free,
            ),
        )

    def soft_loss(self, step: StudentStep, loss: LossConfig) -> SoftLoss:
        """Hard CE on every counted student token, and ULD at the counted positions lined up with a teacher
        position. Both are divided by the count of counted student tokens, so a position without a partner adds
        nothing to the soft term (`aligned_share` in data/split.json says how many have one)."""
        cfg, mask, targets, inputs = loss, step.mask, step.targets, step.inputs
        # The whole micro-batch's count: the soft term, over the lined-up rows only, must use the same divisor.
        count = step.num_items_in_batch if step.num_items_in_batch is not None else targets.shape[0]
        partner = inputs["teacher_positions"][:, 1:][mask]  # (N,): the teacher row of each counted row, or -1
        aligned = partner >= 0
        rows = mask.nonzero()[:, 0][aligned]  # (M,): their sequence in the batch
        with frozen_forward(self.teacher_core):  # inference mode (no_grad where FSDP2 shards it)
            states = final_hidden_states(
                self.teacher, self.teacher_core, inputs["teacher_input_ids"], inputs["teacher_attention_mask"]
            )
            t_hidden = states[rows, partner[aligned]]  # (M, H_t)

        def fused(heads: list[OutputHead], hidden: Tensor, t_hidden: Tensor) -> LossParts:
            head, t_head = heads
            hard = None
            if cfg.alpha < 1:
                hard = chunked_distillation_loss(
                    hidden, head, None, None, targets, alpha=0.0, num_items_in_batch=count, chunk_size=cfg.chunk_size
                )
            soft = chunked_distillation_loss(
                hidden[aligned],
                head,
                t_hidden,
                t_head,
                targets[aligned],
                divergence=DivergenceSpec("uld", cfg.temperature),
                alpha=1.0,
                num_items_in_batch=count,
                chunk_size=cfg.chunk_size,
            )
            zero = (hard if hard is not None else soft).total.detach().new_zeros(())
            return LossParts(
                total=mix_soft_and_hard(soft.total, None if hard is None else hard.total, cfg.alpha),
                soft=soft.soft,
                hard=zero if hard is None else hard.hard,
                num_tokens=mask.sum(),
            )

        # Run as the heads' forward, so FSDP / ZeRO-3 gather them where they shard them (`sharding.through_heads`).
        return SoftLoss(through_heads([step.core, self.teacher_core], fused, step.hidden, t_hidden.clone()))
