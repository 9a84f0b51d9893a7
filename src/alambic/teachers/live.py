"""The live teacher: one model, or several (`additional_teachers`), run on the student's own tokens at every step.

Its hidden states at the counted positions go through its output head, chunk by chunk with the student's
(`loss.implementation: chunked`, never an (N, V) tensor), or as whole logits (`full`, the reference). Several
teachers are mixed or summed as `loss.teachers` says (`losses.mixture`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from alambic.combinations import DECLARED, LIVE
from alambic.losses.chunked import OutputHead, chunked_distillation_loss
from alambic.losses.divergences import LossParts
from alambic.losses.heads import module_logits
from alambic.losses.mixture import multi_teacher_distillation_loss
from alambic.modeling import final_hidden_states
from alambic.sharding import frozen_forward, through_heads
from alambic.teachers.base import Requirements, SoftLoss, StudentStep, TokenBatches
from alambic.teachers.ensemble import TeacherEnsemble, WeightedTeacher, vocab_size_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from alambic.config import LossConfig


class LiveTeachers(TokenBatches):
    """The teacher (and the additional ones) run on the batch's tokens; `setup` places them beside the student; its
    batches are the student's tokens alone (`TokenBatches`)."""

    name: ClassVar[str] = LIVE
    requirements: ClassVar[Requirements] = DECLARED[LIVE]

    def __init__(
        self, teacher: PreTrainedModel, additional: Sequence[WeightedTeacher] = (), teacher_weight: float = 1.0
    ):
        self._given, self.additional, self.teacher_weight = teacher, tuple(additional), teacher_weight
        self.teacher: nn.Module = teacher  # wrapped by `setup` (accelerate, DeepSpeed)
        self.ensemble: TeacherEnsemble | None = None
        self.shared_vocab: int | None = None

    @property
    def teacher_core(self) -> PreTrainedModel:
        return getattr(self.teacher, "module", self.teacher)

    def models(self) -> tuple[nn.Module, ...]:
        return (self._given, *(t.model for t in self.additional))

    def setup(self, trainer: Any) -> None:
        self.teacher = trainer.prepare_teacher(self._given)
        # The other teachers and every teacher's weight (primary first); one teacher: weights (1.0,).
        self.ensemble = TeacherEnsemble(
            self.additional,
            primary_weight=self.teacher_weight,
            device=trainer.args.device,
            prepare=trainer.prepare_teacher,
        )
        # Checkpoints of one family often pad the vocabulary differently (151936 vs 152064); the stages check
        # beforehand that the tokenizers agree, so the logits are compared over the shared ids.
        sizes = {
            vocab_size_of(trainer.accelerator.unwrap_model(trainer.model)),
            vocab_size_of(self.teacher_core),
            *self.ensemble.vocab_sizes,
        }
        self.shared_vocab = min(sizes) if len(sizes) > 1 else None

    def soft_loss(self, step: StudentStep, loss: LossConfig) -> SoftLoss:
        inputs, feats = step.inputs, step.features
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        position_ids = inputs.get("position_ids")  # padding-free batches (training.packing): one row, no mask
        with frozen_forward(self.teacher_core):  # inference mode (no_grad where FSDP2 shards it)
            with feats.capture(self.teacher_core, "teacher") if feats else nullcontext() as t_capture:
                t_hidden = final_hidden_states(self.teacher, self.teacher_core, input_ids, attention_mask, position_ids)
            t_hidden = t_hidden[:, :-1][step.mask]  # (N, H_t)
            t_feats = t_capture.features(step.key_mask) if feats else None
        # Inference tensors cannot be saved for backward: a normal copy of the (N, H_t) states is cheap.
        t_hidden = t_hidden.clone()
        t_feats = t_feats.clone() if t_feats is not None else None
        # The other teachers, one after another (their activations freed in between).
        t_hiddens = [t_hidden, *self.ensemble.hidden_states(input_ids, attention_mask, step.mask, position_ids)]

        options = dict(divergence=loss.divergence_spec, alpha=loss.alpha, num_items_in_batch=step.num_items_in_batch)
        weights = self.ensemble.weights
        vocab = self.shared_vocab
        if loss.implementation == "chunked":
            # Heads and divergence fused, token chunk by token chunk: no (N, V) tensor is ever held.
            # Several teachers: each projected by its own head per chunk, then mixed or summed (loss.teachers).
            def objective(heads: list[OutputHead], hidden: Tensor, *t_hiddens: Tensor) -> LossParts:
                return chunked_distillation_loss(
                    hidden,
                    heads[0],
                    list(t_hiddens),
                    heads[1:],
                    step.targets,
                    chunk_size=loss.chunk_size,
                    vocab_size=vocab,
                    teacher_weights=weights,
                    teachers=loss.teachers,
                    **options,
                )
        else:

            def objective(heads: list[OutputHead], hidden: Tensor, *t_hiddens: Tensor) -> LossParts:
                student_logits = module_logits(hidden, heads[0])[:, :vocab]  # (N, V)
                with torch.no_grad():
                    teacher_logits = [module_logits(t, head)[:, :vocab] for head, t in zip(heads[1:], t_hiddens)]
                return multi_teacher_distillation_loss(
                    student_logits, teacher_logits, step.targets, weights=weights, teachers=loss.teachers, **options
                )

        # The heads are read as tensors: `sharding.through_heads` has FSDP / ZeRO-3 gather them where they shard them.
        parts = through_heads(
            [step.core, self.teacher_core, *self.ensemble.head_sources()], objective, step.hidden, *t_hiddens
        )
        return SoftLoss(parts, t_feats)
