"""Where the teacher's signal comes from: one interface (`TeacherSource`, `teachers.base`), one module per kind.

    base.py        TeacherSource           the interface; BatchSettings / Batches (what a source's `batches` takes and
                                           gives), StudentStep / SoftLoss (what its `soft_loss` takes and gives);
                                           TokenBatches and NoLiveTeacher, what several sources share
    live.py        LiveTeachers            one teacher or several, run on the student's tokens (chunked or full)
    cached.py      CachedTopK              the offline top-k cache (data.teacher_cache, found by OfflineCache and
                                           checked by its `batches`), no teacher model loaded; its loss fused with the
                                           student's head (cached_teacher_loss)
    cross.py       CrossTokenizerTeacher   a teacher with another tokenizer: ULD on its own tokens (data.cross)
    classifier.py  ClassifierTeacher       a sequence classifier's class logits, one row per example
    plain.py       NoTeacher               loss.alpha = 0: plain cross-entropy
    ensemble.py    several live teachers (additional_teachers), run one after another
    rules.py       the source's side of the table of combinations (alambic.combinations), when `choose` picks it

The source is chosen once, from what the run declares (`choose`), never by looking at a batch's keys; the trainer
asks it for its batches (`source.batches(data, settings)`: the sets and the collator that brings its columns).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from alambic import combinations
from alambic.teachers.base import (
    Batches,
    BatchSettings,
    NoLiveTeacher,
    Requirements,
    SoftLoss,
    StudentStep,
    TeacherSource,
    TokenBatches,
)
from alambic.teachers.cached import CachedTopK, OfflineCache
from alambic.teachers.classifier import ClassifierTeacher
from alambic.teachers.cross import CrossTokenizerTeacher
from alambic.teachers.live import LiveTeachers
from alambic.teachers.plain import NoTeacher
from alambic.teachers.rules import RULES, Setting, check_combination

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from alambic.config import LossConfig
    from alambic.teachers.ensemble import WeightedTeacher

__all__ = [
    "RULES",
    "SOURCES",
    "BatchSettings",
    "Batches",
    "CachedTopK",
    "ClassifierTeacher",
    "CrossTokenizerTeacher",
    "LiveTeachers",
    "NoLiveTeacher",
    "NoTeacher",
    "OfflineCache",
    "Requirements",
    "SoftLoss",
    "StudentStep",
    "TeacherSource",
    "TokenBatches",
    "check_combination",
    "choose",
    "combination_table",
]

# Every kind, for the combination table; a new kind declares its requirements in alambic.combinations.DECLARED,
# adds its class here and its case in `choose`.
SOURCES = (LiveTeachers, CachedTopK, CrossTokenizerTeacher, ClassifierTeacher, NoTeacher)


def combination_table() -> list[tuple[str, dict[str, bool]]]:
    """Each feature of the table and, for each kind of source, whether it combines (docs/architecture.md shows it);
    the kinds in `SOURCES`' order, as each class declares its requirements."""
    table = dict(combinations.combination_table())
    return [(feature, {cls.name: table[feature][cls.name] for cls in SOURCES}) for feature in table]


def choose(
    loss: LossConfig,
    *,
    teacher: PreTrainedModel | None = None,
    cached: bool | OfflineCache = False,
    cross_tokenizer: bool = False,
    teacher_pad_token_id: int | None = None,
    additional: Sequence[WeightedTeacher] = (),
    teacher_weight: float = 1.0,
) -> TeacherSource:
    """The teacher source of a language-model distillation, from what the run declares, checked against `RULES`.

    Args:
        teacher: the teacher model (unused at loss.alpha = 0, where plain cross-entropy needs none).
        cached: the batches bring an offline cache's top-k rows (data.teacher_cache) instead of a teacher: an
            `OfflineCache` says where they are read from (True: the loss alone, for batches that carry them).
        cross_tokenizer: the teacher reads the texts in its own tokens (data.cross, loss.divergence 'uld');
            `teacher_pad_token_id` (its tokenizer's pad id) pads them in the batches.
        additional, teacher_weight: more teachers, and the first one's weight among them.

    Raises:
        ValueError: alpha > 0 without a teacher or a cache; a feature the source does not serve (`RULES`).
    """
    if teacher is None and loss.alpha > 0 and not cached:
        raise ValueError(
            f"loss.alpha = {loss.alpha} needs a teacher (or an offline teacher cache); only alpha = 0 "
            "(plain CE) runs without one"
        )
    if cached:
        source: TeacherSource = CachedTopK(None if cached is True else cached)
    elif loss.alpha == 0:
        source = NoTeacher()
    elif cross_tokenizer:
        source = CrossTokenizerTeacher(teacher, teacher_pad_token_id)
    else:
        source = LiveTeachers(teacher, additional, teacher_weight)
    check_combination(source, Setting(loss, tuple(t.name for t in additional), teacher is not None, bool(cached)))
    return source
