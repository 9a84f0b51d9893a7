import pytest
import yaml

from alambic.cli import quickstart_config_text
from alambic.config import ConfigError, RunConfig, load_config, validate_config

BASE = {"teacher": {"model": "smollm2-135m-instruct"}, "student": {"from_teacher": {"layers": "every_other"}}}


def _with(**sections):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for key, value in sections.items():
        data[key] = value
    return data


def test_defaults_are_written_out(tmp_path):
    cfg = validate_config(BASE)
    text = cfg.to_yaml()
    for field in ("temperature", "alpha", "max_steps", "validation_fraction", "ce_control"):
        assert field in text
    assert RunConfig.model_validate(yaml.safe_load(text)) == cfg


def test_every_problem_is_reported_once_with_its_path():
    data = _with(loss={"temperature": -1, "alpha": 1.5, "divergnce": "kl"}, training={"max_steps": "many"})
    with pytest.raises(ConfigError) as err:
        validate_config(data, origin="x.yaml")
    msg = str(err.value)
    assert "x.yaml: invalid configuration (4 problems)" in msg
    assert "loss.temperature" in msg and "greater than 0" in msg and "-1" in msg
    assert "loss.alpha" in msg and "less than or equal to 1" in msg
    assert "loss.divergnce: unknown key" in msg
    assert "training.max_steps" in msg and "'many'" in msg


def test_unknown_divergence_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match="forward_kl.*reverse_kl"):
        validate_config(_with(loss={"divergence": "kl"}))


def test_bf16_is_true_false_or_auto_and_never_with_fp16():
    assert validate_config(_with(training={"bf16": "auto"})).training.bf16 == "auto"
    with pytest.raises(ConfigError, match="training.bf16") as err:
        validate_config(_with(training={"bf16": "maybe"}))
    assert "'auto'" in str(err.value)
    for bf16 in (True, "auto"):
        with pytest.raises(ConfigError, match="training.bf16 and training.fp16 are exclusive"):
            validate_config(_with(training={"bf16": bf16, "fp16": True}))


def test_missing_files_fail_at_load_time(tmp_path):
    with pytest.raises(ConfigError, match=r"data.*not found: .*nope\.txt"):
        validate_config(_with(data={"source": "files", "paths": [str(tmp_path / "nope.txt")]}))


def test_student_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of student.model"):
        validate_config(_with(student={}))
    with pytest.raises(ConfigError, match="exactly one of student.model"):
        validate_config(_with(student={"model": "x", "from_teacher": {}}))


def test_missing_section_and_file(tmp_path):
    with pytest.raises(ConfigError, match="teacher: required field is missing"):
        validate_config({"student": {"model": "x"}})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_bad_yaml_and_overrides(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    cfg = load_config(good, ["loss.temperature=2", "training.report_to=[tensorboard]"])
    assert cfg.loss.temperature == 2.0 and cfg.training.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(good, ["loss.temperature"])


def test_relative_data_paths_resolve_against_the_config(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_with(data={"source": "files", "paths": ["corpus"]})))
    assert load_config(path).data.paths[0] == tmp_path / "corpus"


def test_quickstart_config_is_valid():
    cfg = validate_config(yaml.safe_load(quickstart_config_text()))
    assert cfg.teacher.model == "smollm2-135m-instruct"
    assert cfg.student.from_teacher.resolved_layers() == "importance" and cfg.student.from_teacher.num_layers == 15


@pytest.mark.parametrize(
    "from_teacher,resolved",
    [
        ({}, "every_other"),
        ({"hidden_size": 16}, "all"),
        ({"layers": "importance", "num_layers": 2}, "importance"),
        ({"target_parameters": 5e4}, "importance"),
        ({"target_parameters": 5e4, "target_axis": "width"}, "all"),
        ({"layers": [0, 2], "intermediate_size": 32}, [0, 2]),
    ],
)
def test_from_teacher_resolves_which_layers_to_keep(from_teacher, resolved):
    ft = validate_config(_with(student={"from_teacher": from_teacher})).student.from_teacher
    assert ft.resolved_layers() == resolved
    assert ft.needs_importance == (resolved in ("all", "importance") or "intermediate_size" in from_teacher)


@pytest.mark.parametrize(
    "from_teacher,message",
    [
        ({"layers": "importance"}, "layers: importance needs num_layers"),
        ({"num_layers": 3}, "num_layers is used with layers: importance"),
        (
            {"target_parameters": 5e4, "hidden_size": 16},
            r"target_parameters chooses the shape itself: remove \['hidden_size'\]",
        ),
        ({"target_parameters": 5e4, "layers": "every_other"}, "layers are chosen by importance"),
        ({"hidden_size": 0}, "student.from_teacher.hidden_size: Input should be greater than 0"),
    ],
)
def test_from_teacher_rejects_contradictions(from_teacher, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_with(student={"from_teacher": from_teacher}))
