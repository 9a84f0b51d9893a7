"""The teacher sources: chosen once by what the run declares, one table of the features each combines with, and one
base for the LM and classifier trainers."""

from dataclasses import replace

import pytest
import torch

from alambic.combinations import DECLARED, ROWS
from alambic.config import ConfigError, LossConfig, validate_config
from alambic.teachers import (
    RULES,
    SOURCES,
    Batches,
    BatchSettings,
    CachedTopK,
    ClassifierTeacher,
    CrossTokenizerTeacher,
    LiveTeachers,
    NoLiveTeacher,
    NoTeacher,
    OfflineCache,
    TokenBatches,
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
    assert isinstance(
        choose(LossConfig(alpha=0.5, divergence="uld"), teacher=teacher, cross_tokenizer=True), CrossTokenizerTeacher
    )
    assert isinstance(choose(LossConfig(alpha=0.0), teacher=teacher), NoTeacher)
    assert isinstance(choose(LossConfig(alpha=0.0)), NoTeacher)


def test_alpha_without_a_teacher_or_a_cache_is_refused():
    with pytest.raises(ValueError, match=r"loss.alpha = 0.5 needs a teacher \(or an offline teacher cache\)"):
        choose(LossConfig(alpha=0.5))


def test_every_rule_is_read_off_the_declared_requirements():
    rows = dict(combination_table())
    assert list(rows) == [
        "loss.features",
        "loss.on_policy",
        "data.teacher_cache",
        "data.selection",
        "additional_teachers",
        "data.teacher_responses with loss.alpha > 0",
        "training.packing: padding_free",
        "loss.divergence: logit_mse",
    ]
    assert rows["additional_teachers"] == {
        "live teacher": True,
        "offline teacher cache": False,
        "teacher with another tokenizer": False,
        "classifier teacher": False,
        "no teacher": False,
    }
    for feature in ("loss.features", "loss.on_policy"):
        assert [name for name, ok in rows[feature].items() if ok] == ["live teacher"]
    for feature in ("data.teacher_cache", "data.selection"):  # a classifier has no next-token rows
        assert [name for name, ok in rows[feature].items() if not ok] == [
            "teacher with another tokenizer",
            "classifier teacher",
        ]
    assert [name for name, ok in rows["loss.divergence: logit_mse"].items() if not ok] == ["offline teacher cache"]
    assert {rule.needs for rule in RULES} <= set(SOURCES[0].requirements.__dataclass_fields__)
    # the classes declare what the torch-free table reads (the config checks the same declarations)
    for cls in SOURCES:
        assert replace(cls.requirements, columns=()) == DECLARED[cls.name], cls.name


def test_every_refusal_the_table_derives_has_its_words():
    for row in ROWS:
        refused = {kind for kind in DECLARED if not row.serves(kind)} - {"teacher with another tokenizer"}
        assert set(row.refusals) == refused, row.feature
        for words in row.refusals.values():
            assert row.feature.split(":")[0].split(" ")[0] in words, (row.feature, words)


def test_the_config_refuses_every_feature_its_sources_cannot_serve_at_once():
    """One table at config load: the cache's three refusals in one ConfigError (each validator used to stop at its
    first), each naming both features and the way round."""
    data = {
        "teacher": {"model": "smollm2-135m-instruct"},
        "student": {"from_teacher": {"layers": "every_other"}},
        "data": {"teacher_cache": {}},
        "loss": {"features": {"attention": {}}, "on_policy": {}},
        "additional_teachers": [{"model": "smollm2-135m-instruct"}],
    }
    data["data"]["format"] = "chat"
    with pytest.raises(ConfigError) as err:
        validate_config(data)
    msg = str(err.value)
    for words in (
        "loss.features needs the live teacher's hidden states and attention, which data.teacher_cache",
        "loss.on_policy has the live teacher score the student's fresh responses, which data.teacher_cache",
        "data.teacher_cache holds the top-k log-probs of `teacher` alone: several "
        "teachers cannot use it; remove data.teacher_cache or additional_teachers",
    ):
        assert words in msg
    data = {
        "teacher": {"model": "smollm2-135m-instruct"},
        "student": {"from_teacher": {"layers": "every_other"}},
        "task": "sequence_classification",
        "data": {"format": "classification", "selection": {}},
        "loss": {"features": {"attention": {}}},
        "additional_teachers": [{"model": "smollm2-135m-instruct"}],
    }
    with pytest.raises(ConfigError) as err:
        validate_config(data)
    msg = str(err.value)
    for words in (
        "loss.features (hidden states, attention) is not supported for classifiers",
        "data.selection ranks sequences by the teacher's next-token entropy, which a classifier",
        "additional_teachers (teacher ensembles) are not supported for classifiers",
    ):
        assert words in msg


@pytest.mark.parametrize(
    "declared, match",
    [
        (
            dict(cached=True, loss=LossConfig(alpha=1.0, features={"attention": {}})),
            "loss.features needs a live teacher",
        ),
        (dict(cached=True, loss=LossConfig(alpha=1.0, on_policy={})), "loss.on_policy needs a live teacher"),
        (
            dict(cached=True, loss=LossConfig(alpha=1.0), extra=True),
            r"additional teachers \['additional_0'\] need the "
            r"live primary teacher .*teacher=None, alpha = 1.0, an offline teacher cache",
        ),
        (
            dict(cross_tokenizer=True, loss=LossConfig(alpha=1.0, divergence="uld", features={"attention": {}})),
            "loss.features needs a live teacher",
        ),
    ],
)
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


def test_the_table_and_the_config_load_without_torch():
    """The config reads the table when it loads, so the table and the declarations stay torch-free."""
    import subprocess
    import sys

    code = "import sys, alambic.combinations, alambic.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- each source's batches


def test_a_new_sources_columns_reach_its_soft_loss_through_train(tmp_path):
    """A new kind of source brings its own column: `train` asks the source for its batches instead of choosing a
    collator by kind, so what the source's collator adds is what its `soft_loss` reads."""
    from alambic.config import TrainingConfig
    from alambic.data import DistillationCollator
    from alambic.training.run import train
    from helpers import tiny_prepared, tiny_tokenizer

    class Weighted(NoLiveTeacher):
        name = "weighted examples"
        requirements = replace(DECLARED["no teacher"], columns=("weight",))

        def __init__(self):
            self.seen: list[torch.Tensor] = []

        def batches(self, data, settings):
            pad = DistillationCollator(pad_token_id=settings.pad_token_id)

            def collate(features):
                return {**pad(features), "weight": torch.full((len(features),), 0.5)}

            return Batches(data.train, data.validation, collate)

        def soft_loss(self, step, loss):
            self.seen.append(step.inputs["weight"])
            return NoTeacher().soft_loss(step, loss)

    source = Weighted()
    summary = train(
        tiny_model(num_layers=1),
        tiny_tokenizer(),
        tiny_prepared(tmp_path),
        teacher=None,
        loss=LossConfig(alpha=0.0),
        training=TrainingConfig(max_steps=2, save_steps=100),
        output_dir=tmp_path / "run",
        source=source,
    )
    assert summary["global_step"] == 2
    assert len(source.seen) == 2 and all(torch.equal(w, torch.full_like(w, 0.5)) for w in source.seen)


def test_each_source_says_what_its_batches_need(tmp_path):
    from alambic.data import DistillationCollator
    from alambic.data.classification import ClassificationCollator
    from alambic.data.prepared import PreparedData

    data = PreparedData(train=[{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}], validation=[])
    teacher = tiny_model(num_layers=1)
    settings = BatchSettings(pad_token_id=3, prompt_lengths=True)
    for source in (choose(LossConfig(alpha=0.5), teacher=teacher), choose(LossConfig(alpha=0.0))):
        batches = source.batches(data, settings)
        assert batches.train is data.train and batches.validation is data.validation
        assert batches.collator == DistillationCollator(pad_token_id=3, prompt_lengths=True)
    cross = choose(
        LossConfig(alpha=0.5, divergence="uld"), teacher=teacher, cross_tokenizer=True, teacher_pad_token_id=9
    )
    assert cross.batches(data, settings).collator == DistillationCollator(
        pad_token_id=3, prompt_lengths=True, teacher_pad_token_id=9
    )
    assert ClassifierTeacher(None).batches(data, BatchSettings(4)).collator == ClassificationCollator(4)
    # a source made for the loss alone says what it lacks to make batches
    with pytest.raises(ValueError, match=r"teachers.choose\(..., teacher_pad_token_id=...\)"):
        choose(LossConfig(alpha=0.5, divergence="uld"), teacher=teacher, cross_tokenizer=True).batches(data, settings)
    with pytest.raises(ValueError, match=r"teachers.choose\(..., cached=OfflineCache"):
        choose(LossConfig(alpha=0.5), cached=True).batches(data, settings)


def test_the_cache_sources_batches_check_the_cache_first(tmp_path):
    """The offline cache's fingerprint is checked when its batches are made (before any step), with the cache's own
    messages; then every split brings its rows, collated for the trainer."""
    from alambic.data.cache import CachedTeacherCollator, CacheMismatchError, cache_fingerprint, write_teacher_cache
    from helpers import tiny_prepared, tiny_tokenizer

    data, tokenizer, teacher = tiny_prepared(tmp_path, chat=True), tiny_tokenizer(), tiny_model(seed=0)

    def fingerprint(dataset):
        return cache_fingerprint(tokenizer, dataset, k=4, temperature=1.0, teacher_id="tiny")

    for split in ("train", "validation"):
        dataset = getattr(data, split)
        write_teacher_cache(
            teacher,
            dataset,
            tmp_path / "cache" / split,
            k=4,
            temperature=1.0,
            dtype="float32",
            fingerprint=fingerprint(dataset),
            progress=False,
        )
    source = choose(LossConfig(alpha=1.0), cached=OfflineCache(tmp_path / "cache", fingerprint))
    batches = source.batches(data, BatchSettings(pad_token_id=3))
    assert isinstance(batches.collator, CachedTeacherCollator) and batches.collator.pad_token_id == 3
    batch = batches.collator([batches.train[i] for i in range(2)])
    assert set(CachedTopK.requirements.columns) <= set(batch)
    assert len(batches.validation) == len(data.validation) and "teacher_ids" in batches.validation[0]

    hotter = OfflineCache(tmp_path / "cache", lambda d: {**fingerprint(d), "temperature": 2.0})
    with pytest.raises(CacheMismatchError, match=r"teacher cache .*train was made for another temperature"):
        choose(LossConfig(alpha=1.0), cached=hotter).batches(data, BatchSettings(pad_token_id=3))
    with pytest.raises(FileNotFoundError, match="no complete teacher cache"):
        choose(LossConfig(alpha=1.0), cached=OfflineCache(tmp_path / "nowhere", fingerprint)).batches(
            data, BatchSettings(pad_token_id=3)
        )


def test_the_sources_without_a_live_teacher_share_one_base():
    for cls in (CachedTopK, NoTeacher):
        assert issubclass(cls, NoLiveTeacher) and cls.teacher_core is None
        assert cls.models is NoLiveTeacher.models and cls.setup is NoLiveTeacher.setup
    assert LiveTeachers.batches is NoTeacher.batches is TokenBatches.batches
