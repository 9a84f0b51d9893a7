import pytest
import yaml
from typer.testing import CliRunner

from alambic.cli import app
from alambic.config import validate_config

runner = CliRunner()
COMMANDS = ["run", "prune", "distill", "cache", "quickstart", "report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_quickstart_prints_a_valid_editable_config():
    result = runner.invoke(app, ["quickstart", "--print-config"])
    assert result.exit_code == 0
    assert validate_config(yaml.safe_load(result.stdout)).name == "quickstart"


def test_a_bad_config_exits_2_naming_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"model": "x"}, "student": {"model": "y"}, "loss": {"alpha": 2}}))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "loss.alpha" in " ".join(result.output.split())


def test_a_missing_model_exits_2_and_says_what_to_do(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "teacher": {"model": str(tmp_path / "nowhere")},
                                    "student": {"from_teacher": {}}}))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "no such folder" in " ".join(result.output.split())


def test_report_of_an_unevaluated_folder_exits_2(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "eval.json" in result.output


def test_prune_without_from_teacher_exits_2_and_says_what_to_do(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"model": "x"}, "student": {"model": "my-student"}}))
    result = runner.invoke(app, ["prune", str(path)])
    assert result.exit_code == 2
    assert "add a student.from_teacher section" in " ".join(result.output.split())


def test_prune_to_an_impossible_shape_exits_2_naming_the_size(tmp_path):
    from helpers import save_tiny_pair, write_text_corpus

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "runs"), "teacher": {"model": str(save_tiny_pair(tmp_path)), "device": "cpu"},
        "student": {"from_teacher": {"hidden_size": 1000, "calibration_sequences": 2}},
        "data": {"source": "files", "paths": [str(write_text_corpus(tmp_path / "corpus"))], "max_seq_len": 16},
    }))
    result = runner.invoke(app, ["prune", str(path)])
    assert result.exit_code == 2, result.output
    assert "hidden_size=1000: keep between 1 and the teacher's 32" in " ".join(result.output.split())
