"""The one interface every kind of teacher signal implements (`TeacherSource`), what a source declares it needs
(`Requirements`), the values that cross it (`BatchSettings` in and `Batches` out before training, `StudentStep` in
and `SoftLoss` out at each step), and what the sources share (`TokenBatches`, `NoLiveTeacher`).

A trainer runs the student's forward, hands the result to its source's `soft_loss`, adds the feature terms, logs:
it never looks at the batch's keys to find out which teacher it has. The source is chosen once, from the config
(`teachers.choose`), and the combinations of features it cannot serve are refused from its `Requirements`
(declared, torch-free, in `alambic.combinations`, which the config reads too; `teachers.rules`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from torch import Tensor, nn

from alambic.combinations import Requirements
from alambic.data.tokenize import DistillationCollator
from alambic.losses.divergences import LossParts

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from alambic.config import LossConfig, TrainingConfig
    from alambic.data import PreparedData


@dataclass(frozen=True)
class BatchSettings:
    """What the run asks of every source's batches, whatever the source.

    Attributes:
        pad_token_id: the student's pad id (a classifier: its config's, which its head reads to find each example's
            last token).
        prompt_lengths: each row's prompt length too (`prompt_length`): loss.on_policy answers the prompts.
        padding_free: the sequences end to end in one row (training.packing: padding_free).
    """

    pad_token_id: int
    prompt_lengths: bool = False
    padding_free: bool = False

    @classmethod
    def of(cls, pad_token_id: int, loss: LossConfig, training: TrainingConfig) -> BatchSettings:
        return cls(
            pad_token_id, prompt_lengths=loss.on_policy is not None, padding_free=training.packing == "padding_free"
        )


@dataclass
class Batches:
    """What a trainer is given to iterate: the training and held-out sets as the source reads them, and the collator
    that makes their batches (input_ids, attention_mask, labels, and the source's `requirements.columns`)."""

    train: Any
    validation: Any
    collator: Callable[[list[dict[str, Any]]], dict[str, Tensor]]


@dataclass
class StudentStep:
    """The student's side of one micro-batch, after its forward.

    Attributes:
        core: the unwrapped student (its output head projects `hidden`).
        inputs: the batch as the collator made it.
        targets: (N,) the label of each counted position (-100: not counted); a classifier: (B,) class ids.
        num_items_in_batch: the whole accumulated batch's count of counted tokens (the loss's divisor), or None.
        hidden: (N, H) the student's final hidden states at the counted positions (language models).
        mask: (B, T - 1) which positions count (language models).
        logits: (B, C) the student's class logits (classifiers).
        features: the feature distiller, when the loss has feature terms (the teacher's side is captured with it).
        key_mask: (B, T) the non-padding tokens (the feature terms' keys).
    """

    core: PreTrainedModel
    inputs: dict[str, Any]
    targets: Tensor
    num_items_in_batch: Tensor | int | None
    hidden: Tensor | None = None
    mask: Tensor | None = None
    logits: Tensor | None = None
    features: Any = None  # a training.features.FeatureDistiller (not imported: training imports this package)
    key_mask: Tensor | None = None


@dataclass
class SoftLoss:
    """A source's loss of one micro-batch: `parts` mixes its soft term with the hard cross-entropy (alpha), and
    `teacher_features` is the teacher's side of the feature terms (only a source with live hidden states has it)."""

    parts: LossParts
    teacher_features: Any = None  # training.features.CapturedFeatures


class TeacherSource(Protocol):
    """One kind of teacher signal: live, cached top-k, cross-tokenizer (ULD), classifier.

    A new kind is one module of `alambic.teachers` with a class like this, and one line in `teachers.choose`.
    Before training, `batches` gives the trainer its sets and collator; at each step, `soft_loss` reads what that
    collator put in the batch.
    """

    name: ClassVar[str]  # as the refusals name it ("live teacher", "offline teacher cache", ...)
    requirements: ClassVar[Requirements]

    @property
    def teacher_core(self) -> PreTrainedModel | None:
        """The first teacher, unwrapped, where it runs live on the student's tokens (None: no such teacher)."""

    def models(self) -> tuple[nn.Module, ...]:
        """The teacher models it runs (compiled with the student's layers, given back their forward afterwards)."""

    def setup(self, trainer: Any) -> None:
        """Place its teachers as the trainer places models (accelerate, DeepSpeed), before the first step."""

    def batches(self, data: PreparedData, settings: BatchSettings) -> Batches:
        """The sets and the collator its `soft_loss` reads (the collator adds `requirements.columns`). A source whose
        rows must match the data checks them here, before any step (the offline cache: its fingerprint)."""

    def soft_loss(self, step: StudentStep, loss: LossConfig) -> SoftLoss:
        """The loss of one micro-batch: alpha * T^2 * soft + (1 - alpha) * hard, as `LossParts`."""


class TokenBatches:
    """The batches of a source that reads the student's own tokens and nothing more (live teachers, no teacher):
    the prepared sets as they are, padded by `DistillationCollator`."""

    def batches(self, data: PreparedData, settings: BatchSettings) -> Batches:
        return Batches(
            data.train,
            data.validation,
            DistillationCollator(
                pad_token_id=settings.pad_token_id,
                prompt_lengths=settings.prompt_lengths,
                padding_free=settings.padding_free,
            ),
        )


class NoLiveTeacher:
    """A source that runs no teacher model while the student trains (the offline cache, plain cross-entropy):
    nothing to compile, place or give back its forward."""

    teacher_core = None

    def models(self) -> tuple[nn.Module, ...]:
        return ()

    def setup(self, trainer: Any) -> None:
        pass  # no teacher to place beside the student
