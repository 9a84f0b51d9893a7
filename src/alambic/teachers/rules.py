"""The table of which features combine with which teacher signal (`alambic.combinations.ROWS`, read off the
sources' declared `Requirements`), checked once more when `teachers.choose` picks the source: a caller of the
trainers without a `RunConfig` (which refuses the same rows when it loads) gets the refusal by name too.

The words here are the source's side of a refused row: the message names the feature, the source, and the way round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

from alambic.combinations import ROWS, Row

if TYPE_CHECKING:
    from alambic.config import LossConfig
    from alambic.teachers.base import TeacherSource


@dataclass(frozen=True)
class Setting:
    """What the rules read: the loss, the additional teachers' names, and whether a teacher model and an offline
    cache were given (the messages say which the run has)."""

    loss: LossConfig
    additional: Sequence[str] = ()
    teacher_given: bool = False
    cached: bool = False


def _additional_message(s: Setting) -> str:
    return (
        f"additional teachers {list(s.additional)} need the live primary teacher and loss.alpha > 0 (got "
        f"teacher={'a model' if s.teacher_given else 'None'}, alpha = {s.loss.alpha}"
        f"{', an offline teacher cache' if s.cached else ''}): an offline cache holds one teacher"
    )


# The rows a trainer's source can be asked about (those that read the loss and the teachers alone), in order.
MESSAGES: dict[str, Callable[[Setting], str]] = {
    "additional_teachers": _additional_message,
    "loss.features": lambda s: (
        "loss.features needs a live teacher's hidden states: an offline teacher cache has "
        "none, and alpha = 0 loads no teacher; remove loss.features or distil from the live "
        "teacher"
    ),
    "loss.on_policy": lambda s: (
        "loss.on_policy needs a live teacher to score the student's responses: an offline "
        "teacher cache has none, and alpha = 0 loads none; remove loss.on_policy or distil "
        "from the live teacher with alpha > 0"
    ),
}
RULES: tuple[Row, ...] = tuple(
    sorted((row for row in ROWS if row.feature in MESSAGES), key=lambda row: list(MESSAGES).index(row.feature))
)


def check_combination(source: TeacherSource, setting: Setting) -> None:
    """Refuse the first feature of `setting` that `source` does not serve (`RULES`, in order).

    Raises:
        ValueError: the row's message.
    """
    view = SimpleNamespace(loss=setting.loss, additional_teachers=list(setting.additional))
    for row in RULES:
        if row.on(view) and row.needs is not None and not getattr(source.requirements, row.needs):
            raise ValueError(MESSAGES[row.feature](setting))
