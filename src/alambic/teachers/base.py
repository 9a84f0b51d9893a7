"""The one interface every kind of teacher signal implements (`TeacherSource`), what a source declares it needs
(`Requirements`), and the two values that cross it (`StudentStep` in, `SoftLoss` out).

A trainer runs the student's forward, hands the result to its source's `soft_loss`, adds the feature terms, logs:
it never looks at the batch's keys to find out which teacher it has. The source is chosen once, from the config
(`teachers.choose`), and the combinations of features it cannot serve are refused from its `Requirements`
(declared, torch-free, in `alambic.combinations`, which the config reads too; `teachers.rules`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from torch import Tensor, nn

from alambic.combinations import Requirements
from alambic.losses.divergences import LossParts

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from alambic.config import LossConfig


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

    def soft_loss(self, step: StudentStep, loss: LossConfig) -> SoftLoss:
        """The loss of one micro-batch: alpha * T^2 * soft + (1 - alpha) * hard, as `LossParts`."""
