"""The teacher sources: chosen once by what the run declares, one table of the features each combines with, and one
base for the LM and classifier trainers."""

import pytest

from alambic.config import LossConfig
from alambic.teachers import (
    RULES,
    SOURCES,
    CachedTopK,
    ClassifierTeacher,
    CrossTokenizerTeacher,
    LiveTeachers,
    NoTeacher,
    choose,
    combination_table,
)
from alambic.teachers.ensemble import WeightedTeacher
from alambic.training.base import AlambicTrainer
from alambic.training.classifier import ClassifierDistillationTrainer
from alambic.training.trainer import DistillationTrainer
from helpers import tiny_model


def test_the_source_is_chosen_from_the_declarations():
    teacher = tiny_model(num_layers=1)
    assert isinstance(choose(LossConfig(alpha=0.5), teacher=teacher), LiveTeachers)
    assert isinstance(choose(LossConfig(alpha=0.5), cached=True), CachedTopK)
    assert isinstance(choose(LossConfig(alpha=0.5, divergence="uld"), teacher=teacher, cross_tokenizer=True),
                      CrossTokenizerTeacher)
    assert isinstance(choose(LossConfig(alpha=0.0), teacher=teacher), NoTeacher)
    assert isinstance(choose(LossConfig(alpha=0.0)), NoTeacher)


def test_alpha_without_a_teacher_or_a_cache_is_refused():
    with pytest.raises(ValueError, match=r"loss.alpha = 0.5 needs a teacher \(or an offline teacher cache\)"):
        choose(LossConfig(alpha=0.5))


def test_every_rule_is_read_off_the_declared_requirements():
    rows = dict(combination_table())
    assert list(rows) == ["additional_teachers", "loss.features", "loss.on_policy"]
    assert rows["additional_teachers"] == {"live teacher": True, "offline teacher cache": False,
                                           "teacher with another tokenizer": False, "classifier teacher": False,
                                           "no teacher": False}
    for feature in ("loss.features", "loss.on_policy"):
        assert [name for name, ok in rows[feature].items() if ok] == ["live teacher"]
    assert {rule.needs for rule in RULES} <= set(SOURCES[0].requirements.__dataclass_fields__)


@pytest.mark.parametrize("declared, match", [
    (dict(cached=True, loss=LossConfig(alpha=1.0, features={"attention": {}})), "loss.features needs a live teacher"),
    (dict(cached=True, loss=LossConfig(alpha=1.0, on_policy={})), "loss.on_policy needs a live teacher"),
    (dict(cached=True, loss=LossConfig(alpha=1.0), extra=True), r"additional teachers \['additional_0'\] need the "
     r"live primary teacher .*teacher=None, alpha = 1.0, an offline teacher cache"),
    (dict(cross_tokenizer=True, loss=LossConfig(alpha=1.0, divergence="uld", features={"attention": {}})),
     "loss.features needs a live teacher"),
])
def test_a_feature_the_source_cannot_serve_is_refused_by_name(declared, match):
    extra = [WeightedTeacher("additional_0", tiny_model(num_layers=1))] if declared.pop("extra", False) else []
    teacher = None if declared.get("cached") else tiny_model(num_layers=1)
    loss = declared.pop("loss")
    with pytest.raises(ValueError, match=match):
        choose(loss, teacher=teacher, additional=extra, **declared)


def test_the_trainers_share_one_base_for_logging_scaling_and_evaluation():
    for name in ("log", "prediction_step", "record_parts", "per_device_loss"):
        assert getattr(DistillationTrainer, name) is getattr(AlambicTrainer, name), name
        assert getattr(ClassifierDistillationTrainer, name) is getattr(AlambicTrainer, name), name
    assert ClassifierTeacher.requirements.one_row_per_sequence and not LiveTeachers.requirements.one_row_per_sequence
