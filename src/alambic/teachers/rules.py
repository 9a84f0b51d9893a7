"""Which features combine with which teacher signal: one table, read off the sources' declared `Requirements`.

Each row names a feature, when the config turns it on, the requirement it needs of the teacher source, and the
refusal when the chosen source does not offer it: the message names the feature, the source, and the way round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alambic.teachers.base import Requirements

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


@dataclass(frozen=True)
class Rule:
    feature: str
    on: Callable[[Setting], bool]
    needs: str  # a field of `Requirements`
    message: Callable[[Setting], str]


def _additional_message(s: Setting) -> str:
    return (f"additional teachers {list(s.additional)} need the live primary teacher and loss.alpha > 0 (got "
            f"teacher={'a model' if s.teacher_given else 'None'}, alpha = {s.loss.alpha}"
            f"{', an offline teacher cache' if s.cached else ''}): an offline cache holds one teacher")


RULES: tuple[Rule, ...] = (
    Rule("additional_teachers", lambda s: bool(s.additional), "several_teachers", _additional_message),
    Rule("loss.features", lambda s: s.loss.features is not None, "live_hidden_states",
         lambda s: "loss.features needs a live teacher's hidden states: an offline teacher cache has none, and "
                   "alpha = 0 loads no teacher; remove loss.features or distil from the live teacher"),
    Rule("loss.on_policy", lambda s: s.loss.on_policy is not None, "live_hidden_states",
         lambda s: "loss.on_policy needs a live teacher to score the student's responses: an offline teacher cache "
                   "has none, and alpha = 0 loads none; remove loss.on_policy or distil from the live teacher with "
                   "alpha > 0"),
)


def check_combination(source: TeacherSource, setting: Setting) -> None:
    """Refuse the first feature of `setting` that `source` does not serve (`RULES`, in order).

    Raises:
        ValueError: the rule's message.
    """
    requirements: Requirements = source.requirements
    for rule in RULES:
        if rule.on(setting) and not getattr(requirements, rule.needs):
            raise ValueError(rule.message(setting))
